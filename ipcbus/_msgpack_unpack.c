/* ipcbus._speedups.MsgpackValues: the values of a msgpack batch frame, for
 * the common types decoded in C.
 *
 * Once the sender's encoding was in C (_msgpack_pack.c), the receiver was
 * the slower end of a stream, and msgpack's Unpacker was nearly all of it:
 * about 5,900 instructions for a five-key dict, half of them turning the
 * keys into interned strings.
 *
 * MsgpackValues(data, rest) iterates over the msgpack values that `data`
 * (bytes) holds back to back, giving the same Python values as
 * msgpack.Unpacker(raw=False, strict_map_key=False). It decodes nil, bool,
 * int, float, str, bin, array and map, at most MAX_DEPTH deep. At the first
 * value it does not decode itself (an ext type, a Timestamp, invalid UTF-8,
 * a map key that is a container, a value cut short, a byte that is no
 * msgpack) it calls rest(data, offset), with the offset of that value, and
 * from then on gives what the iterator that rest returned gives: msgpack
 * decodes the rest, and every error is msgpack's own (or rest's: a value
 * cut short by the end of the data is an error there, not a quiet end).
 * MsgpackUnpackb does the same for data that holds one value, with
 * msgpack.unpackb as its fallback. The tests compare them with msgpack on
 * generated values and on damaged bytes.
 *
 * Every read is checked against the end of the data before it is made, and
 * a length is checked against the bytes left before anything is allocated
 * for it.
 *
 * Short ASCII map keys go through a small cache of interned strings, so
 * that a key seen before costs a compare instead of a new string and a
 * lookup in the interpreter's table of interned strings (msgpack interns
 * every str key too).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_speedups.h"

#define MAX_DEPTH 32          /* deeper: msgpack's (its limit is higher) */
#define MAX_PREALLOC 65536    /* longer arrays and maps: msgpack's */
#define KEY_CACHE_SIZE 512    /* a power of two */
#define KEY_CACHE_MAX_LEN 24  /* longer keys are not cached */

enum { DECODED = 0, NOT_MINE = 1, FAILED = -1 };

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} Reader;

/* ----------------------------------------------------------------- the keys */

/* Interned str keys by their bytes: a direct-mapped cache (the GIL guards
 * it; no Python code runs while it is used). */
static PyObject *key_cache[KEY_CACHE_SIZE];

static inline size_t
key_slot(const unsigned char *s, Py_ssize_t n)
{
    uint32_t h = 2166136261u ^ (uint32_t)n;  /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++) {
        h = (h ^ s[i]) * 16777619u;
    }
    return h & (KEY_CACHE_SIZE - 1);
}

/* A new reference to the interned str of the UTF-8 bytes s[:n], or NULL:
 * with an exception (a MemoryError), or without (invalid UTF-8: not ours). */
static PyObject *
decode_key(const unsigned char *s, Py_ssize_t n)
{
    size_t slot = 0;
    int cacheable = n <= KEY_CACHE_MAX_LEN;
    for (Py_ssize_t i = 0; cacheable && i < n; i++) {
        cacheable = s[i] < 0x80;
    }
    if (cacheable) {
        slot = key_slot(s, n);
        PyObject *cached = key_cache[slot];
        if (cached != NULL && PyUnicode_GET_LENGTH(cached) == n && memcmp(PyUnicode_DATA(cached), s, (size_t)n) == 0) {
            return Py_NewRef(cached);
        }
    }
    PyObject *key = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
    if (key == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
        }
        return NULL;
    }
    PyUnicode_InternInPlace(&key);
    if (cacheable) {
        Py_XSETREF(key_cache[slot], Py_NewRef(key));
    }
    return key;
}

/* --------------------------------------------------------------- the values */

static inline uint16_t
be16(const unsigned char *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t
be64(const unsigned char *p)
{
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* n bytes from the reader (NULL: fewer are left). */
static inline const unsigned char *
take(Reader *r, Py_ssize_t n)
{
    if (r->end - r->p < n) {
        return NULL;
    }
    const unsigned char *p = r->p;
    r->p += n;
    return p;
}

/* The length that follows a str/bin/array/map code: the next 1, 2 or 4
 * bytes (width), big-endian; -1 if they are not there. */
static inline Py_ssize_t
length(Reader *r, int width)
{
    const unsigned char *p = take(r, width);
    if (p == NULL) {
        return -1;
    }
    return width == 1 ? p[0] : width == 2 ? be16(p) : (Py_ssize_t)be32(p);
}

static int decode(Reader *r, PyObject **out, int depth);

static int
decode_str(Reader *r, Py_ssize_t n, PyObject **out)
{
    const unsigned char *s = n < 0 ? NULL : take(r, n);
    if (s == NULL) {
        return NOT_MINE;
    }
    *out = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
    if (*out == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            return FAILED;
        }
        PyErr_Clear();
        return NOT_MINE;
    }
    return DECODED;
}

static int
decode_array(Reader *r, Py_ssize_t n, PyObject **out, int depth)
{
    /* Each value takes a byte at least. */
    if (n < 0 || n > r->end - r->p || n > MAX_PREALLOC || depth >= MAX_DEPTH) {
        return NOT_MINE;
    }
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return FAILED;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item;
        int res = decode(r, &item, depth + 1);
        if (res != DECODED) {
            Py_DECREF(list);
            return res;
        }
        PyList_SET_ITEM(list, i, item);
    }
    *out = list;
    return DECODED;
}

static int
decode_map(Reader *r, Py_ssize_t n, PyObject **out, int depth)
{
    /* Each key and value take a byte at least. */
    if (n < 0 || n > (r->end - r->p) / 2 || n > MAX_PREALLOC || depth >= MAX_DEPTH) {
        return NOT_MINE;
    }
    PyObject *dict = _PyDict_NewPresized(n);
    if (dict == NULL) {
        return FAILED;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key, *value;
        int res;
        unsigned code = r->p < r->end ? *r->p : 0xc1;
        if ((code & 0xe0) == 0xa0 || code == 0xd9) {
            /* A str key, the common case: interned, through the cache. */
            r->p++;
            Py_ssize_t len = code == 0xd9 ? length(r, 1) : (Py_ssize_t)(code & 0x1f);
            const unsigned char *s = len < 0 ? NULL : take(r, len);
            key = s == NULL ? NULL : decode_key(s, len);
            res = key != NULL ? DECODED : PyErr_Occurred() ? FAILED : NOT_MINE;
        }
        else {
            res = decode(r, &key, depth + 1);
            if (res == DECODED && (PyList_CheckExact(key) || PyDict_CheckExact(key))) {
                Py_DECREF(key);
                res = NOT_MINE;  /* unhashable: msgpack's error */
            }
            else if (res == DECODED && PyUnicode_CheckExact(key)) {
                PyUnicode_InternInPlace(&key);  /* (a long str key) */
            }
        }
        if (res == DECODED) {
            res = decode(r, &value, depth + 1);
            if (res == DECODED) {
                if (PyDict_SetItem(dict, key, value) < 0) {
                    res = FAILED;
                }
                Py_DECREF(value);
            }
            Py_DECREF(key);
        }
        if (res != DECODED) {
            Py_DECREF(dict);
            return res;
        }
    }
    *out = dict;
    return DECODED;
}

/* The next value: DECODED (*out a new reference, the reader past it),
 * NOT_MINE (no exception; the reader anywhere) or FAILED (an exception). */
static int
decode(Reader *r, PyObject **out, int depth)
{
    if (r->p >= r->end) {
        return NOT_MINE;
    }
    unsigned code = *r->p++;
    const unsigned char *p;
    if (code <= 0x7f) {
        *out = PyLong_FromLong((long)code);
        return *out ? DECODED : FAILED;
    }
    if (code >= 0xe0) {
        *out = PyLong_FromLong((long)(int8_t)code);
        return *out ? DECODED : FAILED;
    }
    if (code <= 0x8f) {
        return decode_map(r, code & 0x0f, out, depth);
    }
    if (code <= 0x9f) {
        return decode_array(r, code & 0x0f, out, depth);
    }
    if (code <= 0xbf) {
        return decode_str(r, code & 0x1f, out);
    }
    switch (code) {
    case 0xc0:
        *out = Py_NewRef(Py_None);
        return DECODED;
    case 0xc2:
        *out = Py_NewRef(Py_False);
        return DECODED;
    case 0xc3:
        *out = Py_NewRef(Py_True);
        return DECODED;
    case 0xc4:
    case 0xc5:
    case 0xc6: {
        Py_ssize_t n = length(r, 1 << (code - 0xc4));
        p = n < 0 ? NULL : take(r, n);
        if (p == NULL) {
            return NOT_MINE;
        }
        *out = PyBytes_FromStringAndSize((const char *)p, n);
        return *out ? DECODED : FAILED;
    }
    case 0xca: {
        if ((p = take(r, 4)) == NULL) {
            return NOT_MINE;
        }
        uint32_t bits = be32(p);
        float f;
        memcpy(&f, &bits, sizeof f);
        *out = PyFloat_FromDouble((double)f);
        return *out ? DECODED : FAILED;
    }
    case 0xcb: {
        if ((p = take(r, 8)) == NULL) {
            return NOT_MINE;
        }
        uint64_t bits = be64(p);
        double d;
        memcpy(&d, &bits, sizeof d);
        *out = PyFloat_FromDouble(d);
        return *out ? DECODED : FAILED;
    }
    case 0xcc:
    case 0xcd:
    case 0xce:
    case 0xcf: {
        int width = 1 << (code - 0xcc);
        if ((p = take(r, width)) == NULL) {
            return NOT_MINE;
        }
        uint64_t u = width == 1 ? p[0] : width == 2 ? be16(p) : width == 4 ? be32(p) : be64(p);
        *out = PyLong_FromUnsignedLongLong(u);
        return *out ? DECODED : FAILED;
    }
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3: {
        int width = 1 << (code - 0xd0);
        if ((p = take(r, width)) == NULL) {
            return NOT_MINE;
        }
        int64_t v = width == 1   ? (int8_t)p[0]
                    : width == 2 ? (int16_t)be16(p)
                    : width == 4 ? (int32_t)be32(p)
                                 : (int64_t)be64(p);
        *out = PyLong_FromLongLong(v);
        return *out ? DECODED : FAILED;
    }
    case 0xd9:
    case 0xda:
    case 0xdb:
        return decode_str(r, length(r, 1 << (code - 0xd9)), out);
    case 0xdc:
    case 0xdd:
        return decode_array(r, length(r, code == 0xdc ? 2 : 4), out, depth);
    case 0xde:
    case 0xdf:
        return decode_map(r, length(r, code == 0xde ? 2 : 4), out, depth);
    default:
        return NOT_MINE;  /* 0xc1, the ext types (and Timestamp) */
    }
}

/* ------------------------------------------------------------ MsgpackValues */

typedef struct {
    PyObject_HEAD
    PyObject *data;      /* bytes */
    Py_ssize_t pos;      /* where the next value starts */
    PyObject *fallback;  /* rest(data, offset), until it is called */
    PyObject *rest;      /* then what it returned: the iterator of the rest */
} MsgpackValues;

static PyObject *
values_next(MsgpackValues *self)
{
    if (self->rest != NULL) {
        return Py_TYPE(self->rest)->tp_iternext(self->rest);
    }
    Py_ssize_t size = PyBytes_GET_SIZE(self->data);
    if (self->pos >= size || self->fallback == NULL) {
        return NULL;
    }
    const unsigned char *start = (const unsigned char *)PyBytes_AS_STRING(self->data);
    Reader r = {start + self->pos, start + size};
    PyObject *value;
    int res = decode(&r, &value, 0);
    if (res == DECODED) {
        self->pos = r.p - start;
        return value;
    }
    if (res == FAILED) {
        return NULL;
    }
    /* msgpack decodes (or refuses) the rest, from this value on. */
    PyObject *at = PyLong_FromSsize_t(self->pos);
    if (at == NULL) {
        return NULL;
    }
    PyObject *rest = PyObject_CallFunctionObjArgs(self->fallback, self->data, at, NULL);
    Py_DECREF(at);
    if (rest == NULL) {
        return NULL;
    }
    if (!PyIter_Check(rest)) {
        PyErr_Format(PyExc_TypeError, "MsgpackValues: rest returned %.100s, not an iterator", Py_TYPE(rest)->tp_name);
        Py_DECREF(rest);
        return NULL;
    }
    self->rest = rest;
    Py_CLEAR(self->fallback);
    return Py_TYPE(rest)->tp_iternext(rest);
}

static int
values_traverse(MsgpackValues *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    Py_VISIT(self->rest);
    return 0;  /* (data: bytes) */
}

static int
values_clear(MsgpackValues *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->rest);
    return 0;
}

static void
values_dealloc(MsgpackValues *self)
{
    PyObject_GC_UnTrack(self);
    values_clear(self);
    Py_CLEAR(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
values_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"data", "rest", NULL};
    PyObject *data, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "SO:MsgpackValues", kwlist, &data, &fallback)) {
        return NULL;
    }
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "MsgpackValues: data must be bytes");
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "MsgpackValues: rest must be callable");
        return NULL;
    }
    MsgpackValues *self = (MsgpackValues *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->data = Py_NewRef(data);
        self->fallback = Py_NewRef(fallback);
    }
    return (PyObject *)self;
}

PyTypeObject ipcbus_MsgpackValues_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipcbus._speedups.MsgpackValues",
    .tp_doc = "MsgpackValues(data, rest): the msgpack values in data (bytes), back to back, decoded as "
              "msgpack.Unpacker(raw=False, strict_map_key=False) decodes them; from the first value it does not "
              "decode itself on, what the iterator rest(data, offset) gives.",
    .tp_basicsize = sizeof(MsgpackValues),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = values_new,
    .tp_dealloc = (destructor)values_dealloc,
    .tp_traverse = (traverseproc)values_traverse,
    .tp_clear = (inquiry)values_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)values_next,
};

/* ---------------------------------------------------------- MsgpackUnpackb */

static PyObject *
unpackb_vectorcall(FallbackCall *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_buffer view;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL || PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    }
    Reader r = {view.buf, (const unsigned char *)view.buf + view.len};
    PyObject *value;
    int res = decode(&r, &value, 0);
    PyBuffer_Release(&view);
    if (res == DECODED && r.p == r.end) {
        return value;
    }
    if (res == FAILED) {
        return NULL;
    }
    if (res == DECODED) {
        Py_DECREF(value);  /* more after it: msgpack's ExtraData */
    }
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *
unpackb_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    return ipcbus_fallback_new(type, args, kwargs, (vectorcallfunc)unpackb_vectorcall);
}

PyTypeObject ipcbus_MsgpackUnpackb_Type = FALLBACK_CALL_TYPE(
    "MsgpackUnpackb",
    "MsgpackUnpackb(fallback)(data): the one msgpack value that data (a bytes-like object) holds, decoded in C "
    "as msgpack.unpackb(data, strict_map_key=False) decodes it; fallback(data) for data that is not one value "
    "of the common types.",
    sizeof(FallbackCall), unpackb_new, ipcbus_fallback_dealloc);
