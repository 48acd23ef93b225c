/* ipcbus._speedups.MsgpackPack: the msgpack codec's encoder for the common
 * values, in C.
 *
 * On a stream of small messages, msgpack's own Packer.pack was more than
 * half of what a send cost (about 3,500 instructions for a five-key dict),
 * and the two processes of a channel share the machine: the cheaper the
 * sender, the faster the receiver too.
 *
 * MsgpackPack(fallback)(value) returns the bytes that
 * msgpack.Packer(use_bin_type=True).pack(value) returns, byte for byte, when
 * value is made only of None, bool, exact int (in msgpack's 64-bit range),
 * exact float, exact str, exact bytes, and exact list, tuple and dict of
 * those, nested at most MAX_DEPTH deep. For anything else (a subclass, a
 * bytearray, an ExtType, a string with a lone surrogate, a huge int) it
 * returns fallback(value): msgpack stays the reference, and every error is
 * msgpack's own. The tests compare the two on generated values.
 *
 * No Python code runs while a value of those exact types is encoded (no
 * __hash__, __eq__ or __iter__ of a user's is called), so the buffer that
 * the encoder keeps between calls is never used by two calls at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_speedups.h"

#define MAX_DEPTH 32           /* deeper: msgpack's (its limit is 511) */
#define KEEP_BUFFER 65536      /* a bigger buffer is freed after the call */
#define FIRST_BUFFER 512
#define DIRECT_MIN 4096        /* a top-level str or bytes this long is
                                * copied once, straight into the result */

enum { PACKED = 0, NOT_MINE = 1, FAILED = -1 };

typedef struct {
    FallbackCall base;
    char *buf;
    Py_ssize_t size;  /* bytes written */
    Py_ssize_t cap;
} MsgpackPack;

static int
grow(MsgpackPack *self, Py_ssize_t need)
{
    Py_ssize_t cap = self->cap ? self->cap : FIRST_BUFFER;
    while (cap - self->size < need) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *buf = PyMem_Realloc(self->buf, (size_t)cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->buf = buf;
    self->cap = cap;
    return 0;
}

/* Room for `need` more bytes: a pointer to write them at. */
static inline char *
reserve(MsgpackPack *self, Py_ssize_t need)
{
    if (self->cap - self->size < need && grow(self, need) < 0) {
        return NULL;
    }
    return self->buf + self->size;
}

static inline void
put_be16(char *p, uint16_t v)
{
    p[0] = (char)(v >> 8);
    p[1] = (char)v;
}

static inline void
put_be32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static inline void
put_be64(char *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

/* The length-prefixed families, and the header codes msgpack picks from:
 * the fix form for n <= fix_max (code fix | n), then 8 bits (none where
 * code8 is 0), 16 and 32. */
enum { STR, BIN, ARRAY, MAP };

static const struct {
    unsigned fix;
    Py_ssize_t fix_max;
    unsigned code8, code16, code32;
} FAMILIES[] = {
    [STR] = {0xa0, 31, 0xd9, 0xda, 0xdb},
    [BIN] = {0, -1, 0xc4, 0xc5, 0xc6},
    [ARRAY] = {0x90, 15, 0, 0xdc, 0xdd},
    [MAP] = {0x80, 15, 0, 0xde, 0xdf},
};

/* The header of a family's value of length n, written at p (room for 5):
 * its size, or 0 for n over 32 bits (msgpack refuses those). */
static inline int
header(char *p, Py_ssize_t n, int family)
{
    unsigned code8 = FAMILIES[family].code8;
    if (n <= FAMILIES[family].fix_max) {
        p[0] = (char)(FAMILIES[family].fix | (unsigned)n);
        return 1;
    }
    if (code8 && n <= 0xff) {
        p[0] = (char)code8;
        p[1] = (char)n;
        return 2;
    }
    if (n <= 0xffff) {
        p[0] = (char)FAMILIES[family].code16;
        put_be16(p + 1, (uint16_t)n);
        return 3;
    }
    if ((uint64_t)n <= 0xffffffffu) {
        p[0] = (char)FAMILIES[family].code32;
        put_be32(p + 1, (uint32_t)n);
        return 5;
    }
    return 0;
}

static inline int
put_header(MsgpackPack *self, Py_ssize_t n, int family)
{
    char *p = reserve(self, 5);
    if (p == NULL) {
        return FAILED;
    }
    int size = header(p, n, family);
    self->size += size;
    return size ? PACKED : NOT_MINE;
}

static inline int
put_raw(MsgpackPack *self, const char *data, Py_ssize_t n)
{
    char *p = reserve(self, n);
    if (p == NULL) {
        return FAILED;
    }
    memcpy(p, data, (size_t)n);
    self->size += n;
    return PACKED;
}

/* A str's UTF-8, as msgpack takes it; NULL with no exception: not ours (a
 * lone surrogate: msgpack raises its own error). */
static inline const char *
str_utf8(PyObject *o, Py_ssize_t *n)
{
    const char *data = PyUnicode_AsUTF8AndSize(o, n);
    if (data == NULL && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        PyErr_Clear();
    }
    return data;
}

static int
put_int(MsgpackPack *self, PyObject *o)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    char *p = reserve(self, 9);
    if (p == NULL) {
        return FAILED;
    }
    if (overflow == 0 && v == -1 && PyErr_Occurred()) {
        return FAILED;
    }
    if (overflow < 0) {
        return NOT_MINE;
    }
    uint64_t u;
    if (overflow > 0) {
        u = PyLong_AsUnsignedLongLong(o);
        if (u == (uint64_t)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                return FAILED;
            }
            PyErr_Clear();
            return NOT_MINE;  /* over 64 bits: msgpack's OverflowError */
        }
    }
    else if (v < -32) {
        /* msgpack's signed forms: the smallest of int8/16/32/64 */
        if (v >= -128) {
            p[0] = (char)0xd0;
            p[1] = (char)v;
            self->size += 2;
        }
        else if (v >= -32768) {
            p[0] = (char)0xd1;
            put_be16(p + 1, (uint16_t)v);
            self->size += 3;
        }
        else if (v >= INT32_MIN) {
            p[0] = (char)0xd2;
            put_be32(p + 1, (uint32_t)v);
            self->size += 5;
        }
        else {
            p[0] = (char)0xd3;
            put_be64(p + 1, (uint64_t)v);
            self->size += 9;
        }
        return PACKED;
    }
    else if (v < 0) {
        p[0] = (char)v;  /* negative fixint */
        self->size += 1;
        return PACKED;
    }
    else {
        u = (uint64_t)v;
    }
    if (u < 0x80) {
        p[0] = (char)u;
        self->size += 1;
    }
    else if (u <= 0xff) {
        p[0] = (char)0xcc;
        p[1] = (char)u;
        self->size += 2;
    }
    else if (u <= 0xffff) {
        p[0] = (char)0xcd;
        put_be16(p + 1, (uint16_t)u);
        self->size += 3;
    }
    else if (u <= 0xffffffffu) {
        p[0] = (char)0xce;
        put_be32(p + 1, (uint32_t)u);
        self->size += 5;
    }
    else {
        p[0] = (char)0xcf;
        put_be64(p + 1, u);
        self->size += 9;
    }
    return PACKED;
}

static int
put_value(MsgpackPack *self, PyObject *o, int depth)
{
    PyTypeObject *type = Py_TYPE(o);
    int r;
    if (type == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *data = str_utf8(o, &n);
        if (data == NULL) {
            return PyErr_Occurred() ? FAILED : NOT_MINE;
        }
        if ((r = put_header(self, n, STR)) != PACKED) {
            return r;
        }
        return put_raw(self, data, n);
    }
    if (type == &PyLong_Type) {
        return put_int(self, o);
    }
    if (type == &PyDict_Type) {
        if (depth >= MAX_DEPTH) {
            return NOT_MINE;
        }
        if ((r = put_header(self, PyDict_GET_SIZE(o), MAP)) != PACKED) {
            return r;
        }
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(o, &pos, &key, &value)) {
            if ((r = put_value(self, key, depth + 1)) != PACKED || (r = put_value(self, value, depth + 1)) != PACKED) {
                return r;
            }
        }
        return PACKED;
    }
    if (o == Py_None || o == Py_True || o == Py_False) {
        char *p = reserve(self, 1);
        if (p == NULL) {
            return FAILED;
        }
        p[0] = (char)(o == Py_None ? 0xc0 : o == Py_True ? 0xc3 : 0xc2);
        self->size += 1;
        return PACKED;
    }
    if (type == &PyFloat_Type) {
        char *p = reserve(self, 9);
        if (p == NULL) {
            return FAILED;
        }
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        p[0] = (char)0xcb;
        put_be64(p + 1, bits);
        self->size += 9;
        return PACKED;
    }
    if (type == &PyList_Type || type == &PyTuple_Type) {
        if (depth >= MAX_DEPTH) {
            return NOT_MINE;
        }
        Py_ssize_t n = Py_SIZE(o);
        PyObject **items = type == &PyList_Type ? ((PyListObject *)o)->ob_item : ((PyTupleObject *)o)->ob_item;
        if ((r = put_header(self, n, ARRAY)) != PACKED) {
            return r;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if ((r = put_value(self, items[i], depth + 1)) != PACKED) {
                return r;
            }
        }
        return PACKED;
    }
    if (type == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(o);
        if ((r = put_header(self, n, BIN)) != PACKED) {
            return r;
        }
        return put_raw(self, PyBytes_AS_STRING(o), n);
    }
    return NOT_MINE;
}

/* A top-level str or bytes of DIRECT_MIN bytes or more: its header and data
 * written straight into the result (one copy, and no big buffer kept). */
static PyObject *
pack_direct(PyObject *o)
{
    Py_ssize_t n;
    const char *data;
    int family = BIN;
    if (PyBytes_CheckExact(o)) {
        n = PyBytes_GET_SIZE(o);
        data = PyBytes_AS_STRING(o);
    }
    else {
        family = STR;
        data = str_utf8(o, &n);
        if (data == NULL) {
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_NotImplemented);
        }
    }
    char head[5];
    int size = header(head, n, family);
    if (size == 0) {
        return Py_NewRef(Py_NotImplemented);
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, size + n);
    if (result != NULL) {
        memcpy(PyBytes_AS_STRING(result), head, (size_t)size);
        memcpy(PyBytes_AS_STRING(result) + size, data, (size_t)n);
    }
    return result;
}

static PyObject *
msgpackpack_vectorcall(MsgpackPack *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        return PyObject_Vectorcall(self->base.fallback, args, nargsf, kwnames);
    }
    PyObject *o = args[0];
    PyObject *result;
    if ((PyBytes_CheckExact(o) && PyBytes_GET_SIZE(o) >= DIRECT_MIN)
        || (PyUnicode_CheckExact(o) && PyUnicode_GET_LENGTH(o) >= DIRECT_MIN)) {
        result = pack_direct(o);
    }
    else {
        self->size = 0;
        int r = put_value(self, o, 0);
        result = r == PACKED ? PyBytes_FromStringAndSize(self->buf, self->size)
                 : r == NOT_MINE ? Py_NewRef(Py_NotImplemented) : NULL;
        if (self->cap > KEEP_BUFFER) {
            PyMem_Free(self->buf);
            self->buf = NULL;
            self->cap = 0;
        }
    }
    if (result == Py_NotImplemented) {
        Py_DECREF(result);
        return PyObject_CallOneArg(self->base.fallback, o);
    }
    return result;
}

static void
msgpackpack_dealloc(MsgpackPack *self)
{
    PyMem_Free(self->buf);
    ipcbus_fallback_dealloc((PyObject *)self);
}

static PyObject *
msgpackpack_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    return ipcbus_fallback_new(type, args, kwargs, (vectorcallfunc)msgpackpack_vectorcall);
}

PyTypeObject ipcbus_MsgpackPack_Type = FALLBACK_CALL_TYPE(
    "MsgpackPack",
    "MsgpackPack(fallback): msgpack.Packer(use_bin_type=True).pack for common values, in C; "
    "fallback(value) for every other value.",
    sizeof(MsgpackPack), msgpackpack_new, (destructor)msgpackpack_dealloc);
