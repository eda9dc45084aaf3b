"""Checkpoints inside a task (`checkpoint.every_minutes` / `checkpoint.every_epochs`).

A method's `learn(task)` is ordinary Python: phases (`Trainer.fit` calls) with code between them (pruning,
goal checks, growth). Its frames cannot be saved, so a resumed task runs `learn` again from the task's start
(the last task-boundary checkpoint) and replays what was done before the stop:

- a phase that had finished is not trained again: the method's state as it ended (every attribute of the
  method, the phase's hooks' closure variables, the RNG) is put back *in place*, so that references the
  replayed code holds stay valid, and the phase's figures are returned as before;
- the phase that was running resumes at the epoch boundary it was saved at: the same state, plus its
  optimizers, schedules and counters;
- the code between phases runs again on the same state with the same RNG, so it decides the same.

A snapshot is the method's attributes (except the stream, trainer, hardware and configs, which a resume
rebuilds) pickled together with the hooks' closure variables; functions are not saved (the replayed code
makes them anew). Restoring copies tensors into the live ones where shapes agree and walks containers and
objects recursively (`transplant`).
"""

import io
import pickle
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from clrun import results
from clrun.errors import ClrunError

PHASE_FILE = "task-phase-{}.pt"  # in the run's checkpoints/: a finished phase's end state (`MidTaskCheckpoints`)
_UNSAVED = ("stream", "trainer", "hw", "cfg", "backbone_cfg")  # rebuilt by a resume, never in a snapshot


class _Keep:
    """Stands in a snapshot for what the replayed code makes anew (a lambda or nested function): restoring keeps the
    live one."""


KEEP = _Keep()


def rng_state() -> dict:
    """torch's CPU and CUDA random states."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Put back what `rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _cells(hooks) -> list:
    """The closure variables of `hooks` (the functions a phase was given), in a fixed order."""
    return [cell for hook in hooks if hook is not None for cell in (getattr(hook, "__closure__", None) or ())]


def _held(hooks, carry) -> list:
    """What a phase holds beside the method: the objects its bound-method hooks belong to (e.g. an importance
    tracker's `after_step`) and the optimizer state it carries across phases."""
    return [hook.__self__ for hook in hooks if isinstance(hook, types.MethodType)] + [carry] * (carry is not None)


class _Pickler(pickle.Pickler):
    def __init__(self, file, external: dict):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.names = {id(obj): name for name, obj in external.items()}

    def persistent_id(self, obj):
        if id(obj) in self.names:
            return ("external", self.names[id(obj)])
        if isinstance(obj, types.FunctionType) and "<" in obj.__qualname__:  # a lambda or nested function
            return ("keep", None)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, external: dict):
        super().__init__(file)
        self.external = external

    def persistent_load(self, pid):
        kind, key = pid
        return self.external[key] if kind == "external" else KEEP


def transplant(live, saved, memo: dict, deferred: list):
    """Make `live` equal `saved` in place where it can and return what its holder should keep: `live` itself, or
    `saved` where `live` cannot take its value (immutable, another type or shape). `memo` maps ids of saved
    objects to their live counterparts; dicts keyed by tensors (optimizer states) go to `deferred`, to be
    restored once every tensor has its counterpart."""
    if saved is KEEP:
        return live
    if saved is live or id(saved) in memo:
        return memo.get(id(saved), live)
    if isinstance(saved, torch.Tensor):
        if isinstance(live, torch.Tensor) and (live.shape, live.dtype, live.device) == (
            saved.shape,
            saved.dtype,
            saved.device,
        ):
            with torch.no_grad():
                live.copy_(saved)
            live.grad = None if saved.grad is None else saved.grad.clone()
            memo[id(saved)] = live
            return live
        memo[id(saved)] = saved
        return saved
    if type(live) is not type(saved) or (not isinstance(saved, (dict, list, tuple)) and not _has_state(saved)):
        return saved  # a value (a number, a string, None) is not memoised: equal small ints are one object
    memo[id(saved)] = live
    if isinstance(saved, (dict, list)) and saved and all(v is KEEP for v in _values(saved)):
        return live  # functions only (e.g. a module's hooks): the replayed code registered them anew
    if isinstance(saved, dict):
        if any(isinstance(key, torch.Tensor) for key in saved):
            deferred.append((live, saved))
            return live
        restored = {key: transplant(live.get(key), value, memo, deferred) for key, value in saved.items()}
        live.clear()
        live.update(restored)
    elif isinstance(saved, list):
        if len(live) == len(saved):
            live[:] = [transplant(a, b, memo, deferred) for a, b in zip(live, saved, strict=True)]
        else:
            live[:] = saved
    elif isinstance(saved, tuple):
        if type(saved) is not tuple or len(live) != len(saved):
            return saved
        return tuple(transplant(a, b, memo, deferred) for a, b in zip(live, saved, strict=True))
    else:
        transplant(vars(live), vars(saved), memo, deferred)
        memo[id(vars(saved))] = vars(live)
    return live


def transplant_deferred(deferred: list, memo: dict) -> None:
    """Restore the tensor-keyed dicts `transplant` deferred, once every tensor has its live counterpart in `memo`:
    each key becomes the live counterpart of the saved tensor."""
    for live, saved in deferred:
        restored = {
            memo.get(id(key), key): transplant(live.get(memo.get(id(key), key)), value, memo, [])
            for key, value in saved.items()
        }
        live.clear()
        live.update(restored)


def remove_phase_files(folder: Path) -> None:
    """Remove the finished phases' files (`PHASE_FILE`) of a task from a run's checkpoints/ folder."""
    for path in folder.glob(PHASE_FILE.format("*")):
        path.unlink()


def _has_state(value) -> bool:
    """Whether `value` is an object whose attributes `transplant` restores (not a class, not a plain value)."""
    return hasattr(value, "__dict__") and not isinstance(value, type)


def _values(container):
    return container.values() if isinstance(container, dict) else container


class MidTaskCheckpoints:
    """The phases of the task being learned, and when to save inside it; `Trainer.fit` reports to it.

    Each finished phase's end state goes to its own file in `folder` (`phase_path`), written once; `write(state)`
    stores the state of the running phase with the number of finished ones (the run writes it atomically as
    checkpoints/task.pt); `read(path)` loads a file written here. `saved` in `begin`: a task.pt state of this task
    (None: the task starts afresh)."""

    def __init__(
        self,
        method,
        every_minutes: float | None,
        every_epochs: int | None,
        folder: Path,
        write: Callable[[dict], None],
        read: Callable[[Path], dict],
    ):
        self.method = method
        self.every_seconds = None if every_minutes is None else 60 * every_minutes
        self.every_epochs = every_epochs
        self.folder = folder
        self.write = write
        self.read = read
        self.task = -1

    def phase_path(self, ordinal: int) -> Path:
        """The file of the end state of the task's phase `ordinal`."""
        return self.folder / PHASE_FILE.format(ordinal)

    def begin(self, task: int, saved: dict | None) -> None:
        """A task starts: from its beginning, or replaying `saved` (a state this class wrote for it)."""
        self.task = task
        self.finished_phases = 0 if saved is None else saved["finished_phases"]  # their states: `phase_path`
        self.running = None if saved is None else saved["running"]  # the phase that was running when saved
        self.elapsed_before = 0.0 if saved is None else saved["elapsed"]  # the task's seconds before the stop
        self.started = time.perf_counter()
        self.last_save = time.monotonic()
        self.ordinal = -1  # the phase being trained, counted from 0 in the task

    def end(self) -> None:
        """The task is learned and checkpointed: remove its phases' files."""
        remove_phase_files(self.folder)

    def _external(self) -> dict:
        """What a snapshot refers to by name instead of saving it: the method itself and what a resume rebuilds
        (name -> object; the names hold across processes)."""
        method = self.method
        named = {"method": method} | {name: getattr(method, name, None) for name in _UNSAVED}
        for task in method.stream.tasks:
            named[f"task {task.index}"] = task
            for split_name in ("train", "test", "val"):
                split = getattr(task, split_name)
                if split is not None:
                    named[f"task {task.index} {split_name}"] = split
                    named |= {f"task {task.index} {split_name}.{k}": v for k, v in vars(split).items()}
        return {name: obj for name, obj in named.items() if obj is not None}

    def _snapshot(self, hooks, carry) -> bytes:
        state = {k: v for k, v in vars(self.method).items() if k not in _UNSAVED}
        cells = [cell.cell_contents for cell in _cells(hooks) if _filled(cell)]
        buffer = io.BytesIO()
        try:
            _Pickler(buffer, self._external()).dump((state, cells, _held(hooks, carry)))
        except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as error:
            raise ClrunError(
                f"method {type(self.method).__name__} holds state a checkpoint inside a task cannot save ({error!r}); "
                "leave checkpoint.every_minutes and checkpoint.every_epochs unset for it"
            ) from None
        return buffer.getvalue()

    def _restore(self, snapshot: bytes, hooks, carry) -> None:
        state, cells, held = _Unpickler(io.BytesIO(snapshot), self._external()).load()
        memo, deferred = {}, []
        rebuilt = {name: value for name, value in vars(self.method).items() if name in _UNSAVED}
        transplant(vars(self.method), state, memo, deferred)
        vars(self.method).update(rebuilt)
        live_cells = [cell for cell in _cells(hooks) if _filled(cell)]
        if len(live_cells) != len(cells):
            raise ClrunError("the task's code changed since its checkpoint inside the task; use resume=false")
        for cell, value in zip(live_cells, cells, strict=True):
            cell.cell_contents = transplant(cell.cell_contents, value, memo, deferred)
        for live, value in zip(_held(hooks, carry), held, strict=True):
            transplant(live, value, memo, deferred)
        transplant_deferred(deferred, memo)

    def replay_finished(self, hooks, carry):
        """At a phase's start: when it had finished before the stop, restore the state it ended with and return
        its figures as `finished` was given them (the caller then skips training); else None."""
        self.ordinal += 1
        if self.ordinal >= self.finished_phases:
            return None
        path = self.phase_path(self.ordinal)
        phase = self.read(path)
        if phase["task"] != self.task:
            raise ClrunError(f"{path} belongs to another task than {self.folder / 'task.pt'}; use resume=false")
        self._restore(phase["snapshot"], hooks, carry)
        set_rng_state(phase["rng"])
        return phase["stats"]

    def resume_running(self, hooks, carry) -> dict | None:
        """When this phase was running at the stop: restore the state it was saved in and return its saved
        loop state (optimizers, schedules, counters) for `Trainer.fit`; else None."""
        running = self.running
        if running is None or running["ordinal"] != self.ordinal:
            return None
        self.running = None
        self._restore(running["snapshot"], hooks, carry)
        set_rng_state(running["rng"])
        return running["loop"]

    def due(self, epochs_done: int) -> bool:
        """Whether to save after `epochs_done` epochs of the running phase."""
        due_epochs = self.every_epochs is not None and epochs_done % self.every_epochs == 0
        return due_epochs or (
            self.every_seconds is not None and time.monotonic() - self.last_save >= self.every_seconds
        )

    def save_running(self, hooks, carry, loop: dict) -> None:
        """Save inside the running phase, at the end of an epoch; `loop`: its optimizers', schedules' and counters'
        state, for `resume_running` to hand back."""
        self._save(
            {"ordinal": self.ordinal, "snapshot": self._snapshot(hooks, carry), "rng": rng_state(), "loop": loop}
        )

    def finished(self, hooks, carry, stats: dict) -> None:
        """A phase ended with `stats` (its figures): save the state it ended with, for a replay."""
        state = {"task": self.task, "stats": stats, "snapshot": self._snapshot(hooks, carry), "rng": rng_state()}
        results.atomic_write(self.phase_path(self.ordinal), lambda tmp: torch.save(state, tmp))
        self.finished_phases = self.ordinal + 1

    def _save(self, running: dict) -> None:
        elapsed = self.elapsed_before + time.perf_counter() - self.started
        state = {"task": self.task, "finished_phases": self.finished_phases, "running": running, "elapsed": elapsed}
        self.write(state)
        self.last_save = time.monotonic()


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True
