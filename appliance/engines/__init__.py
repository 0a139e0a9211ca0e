"""Runtimes behind one small interface: a request in, a stream of events out."""
