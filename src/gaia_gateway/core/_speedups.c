/* Optional C speedups for the core's hot path; the core runs the same logic in Python when this
 * module is not built (see _frames.py, which imports it).
 *
 * scan_small(data, pos, lo, hi, step) -> (pos, count)
 *
 * Walks a batch of small, final, unfragmented text or binary frames laid back to back in
 * ``data`` (a bytes-like object) from ``pos``: the first byte is 0x81 or 0x82 and the second
 * byte lies in [lo, hi] (the mask bit the direction expects plus a 7-bit length up to 125),
 * so each frame is ``step + second byte`` bytes long. It stops at the first header that does
 * not match or that is not complete (fewer than 2 bytes left), and returns the position
 * reached, which may lie past the end of ``data`` when the last frame is cut, and how many
 * frames it passed. It never reads past ``data``. This is _frames._scan_small_py, in C:
 * one call per read instead of some 20 bytecodes per frame.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
scan_small(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "scan_small(data, pos, lo, hi, step) takes 5 arguments");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    long lo = PyLong_AsLong(args[2]);
    long hi = PyLong_AsLong(args[3]);
    long step = PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (pos < 0 || lo < 0 || hi > 255 || step + lo < 2) {
        /* step + lo < 2 could stand still or walk backwards */
        PyErr_SetString(PyExc_ValueError, "scan_small: pos, lo, hi or step out of range");
        return NULL;
    }
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t n;
    int release = 0;
    if (PyBytes_CheckExact(args[0])) {
        p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
        n = PyBytes_GET_SIZE(args[0]);
    }
    else {
        if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        release = 1;
        p = (const unsigned char *)view.buf;
        n = view.len;
    }
    Py_ssize_t last = n - 1;
    Py_ssize_t count = 0;
    while (pos < last) {
        unsigned char b0 = p[pos];
        if (b0 != 0x82 && b0 != 0x81) {
            break;
        }
        long b1 = p[pos + 1];
        if (b1 < lo || b1 > hi) {
            break;
        }
        pos += step + b1;
        count++;
    }
    if (release) {
        PyBuffer_Release(&view);
    }
    return Py_BuildValue("(nn)", pos, count);
}

static PyMethodDef speedups_methods[] = {
    {"scan_small", (PyCFunction)(void (*)(void))scan_small, METH_FASTCALL,
     "scan_small(data, pos, lo, hi, step) -> (pos, count): walk small final data frames."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "gaia_gateway.core._speedups",
    "C speedups for the frame relay's hot path (optional; pure Python fallback in _frames).",
    -1,
    speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&speedups_module);
}
