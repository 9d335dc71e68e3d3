"""The runtime's kernel registry: kernel name -> code, per op (see registry.py)."""

from .registry import KernelImpl, Resolution, device_of, implementations, register, resolve, unregister

__all__ = ["KernelImpl", "Resolution", "device_of", "implementations", "register", "resolve", "unregister"]
