"""Reading pickled annotation files (the refCOCO family's `refs(*).p`, gRefCOCO's `grefs(*).p`,
RefZOM's `Ref_ZOM.p`) without running any code they hold.

A pickle runs code only through a callable it names: the opcodes GLOBAL, STACK_GLOBAL, INST
and OBJ fetch one through `Unpickler.find_class`, and REDUCE, NEWOBJ, NEWOBJ_EX and BUILD can
only call or build what is on the stack; PERSID/BINPERSID hand an id to `persistent_load`.
`PlainDataUnpickler` refuses both hooks, so the only objects a pickle can build are those its
opcodes make themselves: dict, list, tuple, str, bytes, int, float, bool and None (and the
equally inert set, frozenset and bytearray). The refusal names the file and the `module.name`
the pickle tried to build, and nothing of it was built.

EXT1/2/4 name a callable registered with `copyreg.add_extension`. Python registers none, and an
unregistered code is a damaged file; but once any unpickler in the process has looked a
registered one up, CPython's unpickler takes it from copyreg's cache without asking
`find_class`. So while the process has any extension registered, the file's opcodes are first
scanned and an EXT opcode is refused (the scan costs about twice the load, so only then).

The real refs files (written by Python 2's pickle, protocol 0 or 2) are lists of dicts of such
values and load exactly as `pickle.load` reads them (same `encoding="ASCII"` for Python 2 byte
strings, as LISA, GSVA and MMR read them). `bytes` pickled by Python 3 below protocol 3 goes
through `_codecs.encode` and is refused; refs files hold no bytes.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import pickletools
from pathlib import Path
from typing import NoReturn

from utils.datasets.base import DataError

EXTENSION_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})


class UnsafePickleError(DataError):
    """A pickle that would build an object (code could run): `built` names it ("posix.system"), or
    "an object from a persistent id" for PERSID/BINPERSID. Nothing of the file was built."""

    def __init__(self, file: str | Path, built: str, hint: str) -> None:
        self.built = built
        problem = (
            f"refusing to unpickle: it would build {built}, and a pickle that builds objects "
            "can run code when loaded (a refs file holds only lists, dicts, strings and "
            "numbers); nothing was loaded"
        )
        super().__init__(file, None, problem, hint)

    def __reduce__(self) -> tuple:
        """Rebuilt from its own arguments when it crosses processes (the doctor's workers,
        DataLoader workers), not from the message alone."""
        return (type(self), (self.file, self.built, self.hint))


class PlainDataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that builds plain data only; any class or callable (and any persistent
    id) raises `UnsafePickleError` for `file` with `hint`."""

    def __init__(self, handle: io.BufferedIOBase, file: Path, hint: str) -> None:
        super().__init__(handle)  # fix_imports=True, encoding="ASCII": pickle.load's defaults
        self.file, self.hint = file, hint

    def find_class(self, module: str, name: str) -> NoReturn:
        raise UnsafePickleError(self.file, f"{module}.{name}", self.hint)

    def persistent_load(self, pid: object) -> NoReturn:
        raise UnsafePickleError(self.file, "an object from a persistent id", self.hint)


def read_plain_pickle(path: Path, hint: str, unreadable_hint: str) -> object:
    """The plain data pickled in `path`. UnsafePickleError (with `hint`) if it would build any
    object; DataError "cannot be read" (with `unreadable_hint`) if it is damaged or no pickle."""
    try:
        with path.open("rb") as handle:
            _refuse_registered_extensions(handle, path, hint)
            return PlainDataUnpickler(handle, path, hint).load()
    except DataError:
        raise
    # unpickling a damaged file can raise almost any exception type
    except Exception as error:
        raise DataError(path, None, f"cannot be read: {error}", unreadable_hint) from error


def _refuse_registered_extensions(handle: io.BufferedIOBase, file: Path, hint: str) -> None:
    """UnsafePickleError if the process has copyreg extensions and the pickle uses one (its
    callable could come from copyreg's cache, past `find_class`); the handle is rewound."""
    # copyreg keeps its registry and cache private; CPython's unpickler reads the same dicts
    registered = copyreg._inverted_registry
    if not registered and not copyreg._extension_cache:
        return
    for opcode, code, _ in pickletools.genops(handle):
        if opcode.name in EXTENSION_OPCODES:
            name = ".".join(registered.get(code, ("an unregistered", "extension")))
            raise UnsafePickleError(file, f"{name} (copyreg extension {code})", hint)
    handle.seek(0)
