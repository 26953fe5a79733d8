"""Built-in backends. Each registers through the `glm52_backends.backends` entry-point group."""
