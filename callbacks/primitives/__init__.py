"""Inspection primitives shared by every check: names, the tie map, checkpoint readers, adapter discovery.

They read models and files; they never change them.
"""
