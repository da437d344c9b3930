"""Each GGUF file parsed once while a test converts or loads it.

transformers builds a new `gguf.GGUFReader` (a parse of the whole metadata: about 11 s on 2 cores for the 262k-token
vocabulary of gemma-3-270m) for the config, the tokenizer and the weights of every `from_pretrained(gguf_file=...)`,
so converting a pivot parses its file four times, and loading the same file again as a reference parses it anew.
A reader only reads (a read-only memmap of the file), so handing out the one already built for a file changes nothing
of what is read: the tests still convert from the file, only the repeated parse is gone.
"""

import contextlib
import os


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, `gguf.GGUFReader(path)` (read-only) returns the reader already built for that file (same
    path, size and modification time); the readers are dropped on leaving it."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers = {}

    def key(path) -> tuple:
        stat = os.stat(path)
        return os.path.realpath(path), stat.st_size, stat.st_mtime_ns

    class ParsedOnce(original):
        def __new__(cls, path, mode="r"):
            if mode == "r" and key(path) in readers:
                return readers[key(path)]
            return super().__new__(cls)

        def __init__(self, path, mode="r"):
            if getattr(self, "_parsed_once", False):
                return
            super().__init__(path, mode)
            if mode == "r":
                self._parsed_once = True
                readers[key(path)] = self

    gguf.GGUFReader = ParsedOnce
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()
