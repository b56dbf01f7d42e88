"""Write pickles the way CIFAR-10's python batches were written (Python 2 cPickle, numpy 1.x).

Protocol 2; every str and bytes is a Python 2 ``str`` (BINSTRING opcodes, read back as bytes
with ``encoding="bytes"``); numpy arrays name ``numpy.core.multiarray._reconstruct``,
``numpy.ndarray`` and ``numpy.dtype``. Test-only: lets the loaders be tested on the real format.
"""

from __future__ import annotations

import io
import pickle
import struct


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def dumps_py2(obj) -> bytes:
    """``obj`` pickled in the CIFAR-10 (Python 2, numpy 1.x) format."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
