"""Import imgaug 0.4.0 under numpy 2.

imgaug 0.4.0 reads `np.sctypes` at import time and uses `np.complex` in two parameters; numpy 2 removed
both. `import_imgaug()` restores exactly those two names (with their numpy 1 meaning) when it is called,
never on import of this module, and leaves everything else alone: numpy 2 already has `np.bool` natively
(it is `np.bool_`), and aliasing it to Python's bool, as some patches do, breaks scipy.
"""
import numpy as np


def _numpy1_sctypes():
    """The dict numpy 1.x exposed as `np.sctypes` (on Linux longdouble is float128, clongdouble complex256)."""
    return {
        "int": [np.int8, np.int16, np.int32, np.int64],
        "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
        "float": [np.float16, np.float32, np.float64, np.longdouble],
        "complex": [np.complex64, np.complex128, np.clongdouble],
        "others": [bool, object, bytes, str, np.void],
    }


def import_imgaug():
    """Return `imgaug.augmenters` after restoring `np.sctypes` and `np.complex` if numpy lacks them."""
    if not hasattr(np, "sctypes"):
        np.sctypes = _numpy1_sctypes()
    if not hasattr(np, "complex"):
        np.complex = complex
    import imgaug.augmenters as iaa
    return iaa
