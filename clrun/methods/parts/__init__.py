"""Parts that several methods are built from: replay memory, importance penalties, weight sharing, accuracy goals
and HAT-style gate training. No part imports a method module."""
