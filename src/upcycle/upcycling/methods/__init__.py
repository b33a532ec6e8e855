"""Built-in expert-initialisation methods, one file each; importing registers them."""

from upcycle.upcycling.methods import btx, drop, granular, naive, nexus, noise, scratch

__all__ = ["btx", "drop", "granular", "naive", "nexus", "noise", "scratch"]
