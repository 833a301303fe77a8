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
 *
 * RelayHead
 *
 * The fields FrameRelay.feed reads on every read, and feed's common cases, in C: the read is
 * payload of the frame in flight, or starts with one final text/binary frame that it holds
 * or starts, or is a batch of small such frames. Anything else goes to FrameRelay's Python
 * methods, which hold every rule: ``_feed_py`` (the whole of feed, in Python) when the
 * stream is stopped, holds a partial header, has a close to inject or is not given bytes;
 * ``_feed_tail(data, pos)`` when the walk stops at a frame it does not take, at ``pos``,
 * with the bytes and the messages before it already counted. _frames.FrameRelay.feed is the
 * same function in Python; the tests run both on the same streams.
 *
 * Why C: at one connection, the ~40 bytecodes of the Python feed ran with cold caches twice
 * per round trip and cost about 5 us of it (bench/RESULTS.md); one C call costs well under 1.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* The walk itself, shared by scan_small and RelayHead.feed; see scan_small. */
static inline Py_ssize_t
walk_small(const unsigned char *p, Py_ssize_t n, Py_ssize_t pos, long lo, long hi, long step,
           Py_ssize_t *count)
{
    Py_ssize_t last = n - 1;
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
        (*count)++;
    }
    return pos;
}

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
    Py_ssize_t count = 0;
    pos = walk_small(p, n, pos, lo, hi, step, &count);
    if (release) {
        PyBuffer_Release(&view);
    }
    return Py_BuildValue("(nn)", pos, count);
}


/* ------------------------------------------------------------------------------ RelayHead */

typedef struct {
    PyObject_HEAD
    long long remaining;   /* payload bytes of the current frame not seen yet */
    long long max_message; /* the message size limit (FrameRelay clamps it to 2**62) */
    long long messages;    /* complete data messages seen */
    long long nbytes;      /* bytes received on this direction */
    PyObject *held;        /* an incomplete header or close frame (bytes), b"" when none */
    PyObject *inject;      /* our close frame waiting for a frame boundary, or None */
    int expect_mask;       /* 0x80: frames must be masked (client to upstream), else 0 */
    char in_message;       /* inside a fragmented message */
    char stopped;          /* forwarding nothing more */
} RelayHead;

static PyObject *str_feed_py;   /* "_feed_py" */
static PyObject *str_feed_tail; /* "_feed_tail" */

static PyObject *
head_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    RelayHead *self = (RelayHead *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->held = PyBytes_FromStringAndSize(NULL, 0);
    if (self->held == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->inject = Py_NewRef(Py_None);
    return (PyObject *)self;
}

static void
head_dealloc(RelayHead *self)
{
    Py_CLEAR(self->held);
    Py_CLEAR(self->inject);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
head_feed(RelayHead *self, PyObject *data)
{
    if (self->stopped || self->inject != Py_None || !PyBytes_CheckExact(data)
        || !PyBytes_CheckExact(self->held) || PyBytes_GET_SIZE(self->held) != 0) {
        return PyObject_CallMethodOneArg((PyObject *)self, str_feed_py, data);
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    self->nbytes += n;
    long long rem = self->remaining;
    if (rem >= n) { /* all of it is payload of the frame in flight */
        self->remaining = rem - n;
        return Py_NewRef(data);
    }
    const int mask = self->expect_mask;
    if (rem == 0 && n > 3 && !self->in_message) {
        /* a complete final text/binary header, and that frame or its start */
        unsigned char b0 = p[0], b1 = p[1];
        if ((b0 == 0x81 || b0 == 0x82) && (b1 & 0x80) == mask) {
            long long length = b1 & 0x7F, end = 0;
            if (length == 126) {
                length = ((long long)p[2] << 8) | p[3];
                end = (mask ? 8 : 4) + length;
            }
            else if (length < 126) {
                end = (mask ? 6 : 2) + length;
            }
            if (end >= n && length <= self->max_message) {
                self->messages++;
                self->remaining = end - n;
                return Py_NewRef(data);
            }
        }
    }
    Py_ssize_t pos = (Py_ssize_t)rem;
    if (self->max_message >= 125 && !self->in_message) {
        /* scan_small's walk: small final text/binary frames back to back */
        Py_ssize_t count = 0;
        pos = walk_small(p, n, pos, mask, mask + 125, (mask ? 6 : 2) - mask, &count);
        self->messages += count;
    }
    if (pos >= n) {
        self->remaining = pos - n;
        return Py_NewRef(data);
    }
    PyObject *at = PyLong_FromSsize_t(pos);
    if (at == NULL) {
        return NULL;
    }
    PyObject *out = PyObject_CallMethodObjArgs((PyObject *)self, str_feed_tail, data, at, NULL);
    Py_DECREF(at);
    return out;
}

static PyMethodDef head_methods[] = {
    {"feed", (PyCFunction)head_feed, METH_O,
     "feed(data) -> bytes to forward now (FrameRelay.feed's common cases, in C)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef head_members[] = {
    {"_remaining", T_LONGLONG, offsetof(RelayHead, remaining), 0, NULL},
    {"_max_message", T_LONGLONG, offsetof(RelayHead, max_message), 0, NULL},
    {"messages", T_LONGLONG, offsetof(RelayHead, messages), 0, "complete data messages seen"},
    {"bytes", T_LONGLONG, offsetof(RelayHead, nbytes), 0, "bytes received on this direction"},
    {"_held", T_OBJECT_EX, offsetof(RelayHead, held), 0, NULL},
    {"_inject", T_OBJECT_EX, offsetof(RelayHead, inject), 0, NULL},
    {"_expect_mask", T_INT, offsetof(RelayHead, expect_mask), 0, NULL},
    {"_in_message", T_BOOL, offsetof(RelayHead, in_message), 0, NULL},
    {"stopped", T_BOOL, offsetof(RelayHead, stopped), 0, "forwarding nothing more"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RelayHeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gaia_gateway.core._speedups.RelayHead",
    .tp_doc = "FrameRelay's per-read fields and feed's common cases, in C (see _frames.py).",
    .tp_basicsize = sizeof(RelayHead),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = head_new,
    .tp_dealloc = (destructor)head_dealloc,
    .tp_methods = head_methods,
    .tp_members = head_members,
};

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
    str_feed_py = PyUnicode_InternFromString("_feed_py");
    str_feed_tail = PyUnicode_InternFromString("_feed_tail");
    if (str_feed_py == NULL || str_feed_tail == NULL || PyType_Ready(&RelayHeadType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "RelayHead", (PyObject *)&RelayHeadType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
