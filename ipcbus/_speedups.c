/* ipcbus._speedups: optional C versions of the two per-message hot paths.
 *
 * Everything here has a pure-Python twin that ipcbus uses when this module
 * is missing (no compiler at install time, Windows, IPCBUS_NO_SPEEDUPS=1),
 * and each fast path handles only the common case, handing every other call
 * to the Python method it wraps:
 *
 *   BurstSend   a method: a small plain message sent while a burst is being
 *               collected joins the burst's list (the Python method does the
 *               same, but a Python call and its lines cost about as much as
 *               encoding the message).
 *   LazyRecv    a method: the next message of a batch being delivered.
 *   (round trip) on Linux, for the blocking Channel: BurstSend writes a reply
 *               itself and LazyRecv does recv's round-trip read, with the
 *               functions of _roundtrip.c.
 *   Messages    an iterator: Message(value, None) for each value of a decoder
 *               (what map(tuple.__new__, repeat(Message), zip(...)) builds,
 *               without the generic tuple constructor per value).
 *
 * The wrappers are descriptors with Py_TPFLAGS_METHOD_DESCRIPTOR, so that
 * ``channel.send(x)`` calls them without building a bound method.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#include "_speedups.h"

/* ------------------------------------------------------------------ shared */

/* The attribute and method names a fast method looks up on the instance,
 * interned once at construction. */
#define MAX_NAMES 4

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fallback;   /* the Python function: every other case */
    PyObject *dict;       /* __doc__, __name__, __wrapped__ (functools.wraps) */
    PyObject *extra;      /* a type's own object (LazyRecv: the Message class) */
    PyObject *names[MAX_NAMES];
} FastMethod;

static int
fastmethod_traverse(FastMethod *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    Py_VISIT(self->dict);
    Py_VISIT(self->extra);
    return 0;  /* (the names are interned strings) */
}

static int
fastmethod_clear(FastMethod *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->dict);
    Py_CLEAR(self->extra);
    for (int i = 0; i < MAX_NAMES; i++) {
        Py_CLEAR(self->names[i]);
    }
    return 0;
}

static void
fastmethod_dealloc(FastMethod *self)
{
    PyObject_GC_UnTrack(self);
    fastmethod_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
fastmethod_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

static PyObject *
fastmethod_repr(FastMethod *self)
{
    return PyUnicode_FromFormat("<%s of %R>", Py_TYPE(self)->tp_name, self->fallback);
}

static PyGetSetDef fastmethod_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict},
    {NULL},
};

/* A new fast method: fallback (callable), then `n` attribute names (str). */
static FastMethod *
fastmethod_new(PyTypeObject *type, vectorcallfunc call, PyObject *fallback, PyObject *const *names, int n)
{
    if (!PyCallable_Check(fallback)) {
        PyErr_Format(PyExc_TypeError, "%s: fallback must be callable", type->tp_name);
        return NULL;
    }
    FastMethod *self = (FastMethod *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = call;
    Py_INCREF(fallback);
    self->fallback = fallback;
    for (int i = 0; i < n; i++) {
        PyObject *name = names[i];
        Py_INCREF(name);
        PyUnicode_InternInPlace(&name);
        self->names[i] = name;
    }
    return self;
}

#define FAST_METHOD_TYPE(STRUCT, NAME, NEW, DOC)                                             \
    {                                                                                        \
        PyVarObject_HEAD_INIT(NULL, 0)                                                       \
        .tp_name = "ipcbus._speedups." NAME,                                                 \
        .tp_doc = DOC,                                                                       \
        .tp_basicsize = sizeof(STRUCT),                                                      \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL     \
                    | Py_TPFLAGS_METHOD_DESCRIPTOR,                                          \
        .tp_new = NEW,                                                                       \
        .tp_dealloc = (destructor)fastmethod_dealloc,                                        \
        .tp_traverse = (traverseproc)fastmethod_traverse,                                    \
        .tp_clear = (inquiry)fastmethod_clear,                                               \
        .tp_repr = (reprfunc)fastmethod_repr,                                                \
        .tp_call = PyVectorcall_Call,                                                        \
        .tp_vectorcall_offset = offsetof(FastMethod, vectorcall),                            \
        .tp_descr_get = fastmethod_get,                                                      \
        .tp_dictoffset = offsetof(FastMethod, dict),                                         \
        .tp_getset = fastmethod_getset,                                                      \
    }


/* A class whose instances are filled like a tuple: a tuple subclass that
 * adds no fields (a named tuple: __slots__ = ()). 0 with TypeError if not. */
static int
message_class_ok(PyObject *cls)
{
    PyTypeObject *tcls = (PyTypeObject *)cls;
    if (!PyType_Check(cls) || !PyType_IsSubtype(tcls, &PyTuple_Type) || tcls->tp_basicsize != PyTuple_Type.tp_basicsize
        || tcls->tp_itemsize != PyTuple_Type.tp_itemsize || tcls->tp_dictoffset != 0) {
        PyErr_SetString(PyExc_TypeError, "the message class must be a tuple subclass with __slots__ = ()");
        return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------- BurstSend */

enum { QUICK, ENCODE, FULL, PLAIN };  /* BurstSend's names */

typedef struct {
    FastMethod base;     /* names: the burst's list of payloads (attribute), the
                          * encoder (attribute, value -> bytes), the method called
                          * once the list holds `count`, the method given a
                          * payload the list refuses */
    Py_ssize_t count;
    Py_ssize_t limit;    /* largest payload the list takes */
    int round_trip;      /* a reply is written here (rt_send) */
} BurstSend;

/* send(self, data): encode; while a burst is being collected (the list is
 * not empty) append a small payload, else hand the payload to `plain`.
 * Other arguments, and values the encoder refuses, are the Python method's. */
static PyObject *
burstsend_vectorcall(BurstSend *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *const *names = self->base.names;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || kwnames != NULL) {
        goto fallback;
    }
    PyObject *obj = args[0];
    PyObject *quick = PyObject_GetAttr(obj, names[QUICK]);
    if (quick == NULL) {
        return NULL;
    }
    if (!PyList_CheckExact(quick)) {
        Py_DECREF(quick);
        goto fallback;
    }
    PyObject *encode = PyObject_GetAttr(obj, names[ENCODE]);
    if (encode == NULL) {
        Py_DECREF(quick);
        return NULL;
    }
    PyObject *payload = PyObject_CallOneArg(encode, args[1]);
    Py_DECREF(encode);
    if (payload == NULL) {
        Py_DECREF(quick);
        if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_ValueError)
            || PyErr_ExceptionMatches(PyExc_OverflowError)) {
            /* The Python method encodes again and raises the CodecError. */
            PyErr_Clear();
            goto fallback;
        }
        return NULL;
    }
    if (PyList_GET_SIZE(quick) == 0 || !PyBytes_CheckExact(payload) || PyBytes_GET_SIZE(payload) > self->limit) {
        /* No burst being collected (a lone send, a reply, a burst's first
         * message), or a payload the list does not take. */
#if HAVE_ROUND_TRIP
        if (self->round_trip && PyList_GET_SIZE(quick) == 0 && PyBytes_CheckExact(payload)) {
            int sent = ipcbus_rt_send(obj, payload);
            if (sent != 0) {
                Py_DECREF(quick);
                Py_DECREF(payload);
                return sent < 0 ? NULL : Py_NewRef(Py_None);
            }
        }
#endif
        Py_DECREF(quick);
        PyObject *result = PyObject_CallMethodOneArg(obj, names[PLAIN], payload);
        Py_DECREF(payload);
        return result;
    }
    int failed = PyList_Append(quick, payload);
    Py_DECREF(payload);
    Py_ssize_t size = PyList_GET_SIZE(quick);
    Py_DECREF(quick);
    if (failed) {
        return NULL;
    }
    if (size >= self->count) {
        PyObject *result = PyObject_CallMethodNoArgs(obj, names[FULL]);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
    }
    Py_RETURN_NONE;

fallback:
    return PyObject_Vectorcall(self->base.fallback, args, nargsf, kwnames);
}

static PyObject *
burstsend_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fallback", "quick", "encode", "full", "plain", "count", "limit", "round_trip", NULL};
    PyObject *fallback, *names[4];
    Py_ssize_t count, limit;
    int round_trip = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUUUUnn|p:BurstSend", kwlist, &fallback, &names[QUICK],
                                     &names[ENCODE], &names[FULL], &names[PLAIN], &count, &limit, &round_trip)) {
        return NULL;
    }
    BurstSend *self = (BurstSend *)fastmethod_new(type, (vectorcallfunc)burstsend_vectorcall, fallback, names, 4);
    if (self != NULL) {
        self->count = count;
        self->limit = limit;
        self->round_trip = round_trip && HAVE_ROUND_TRIP;
    }
    return (PyObject *)self;
}

static PyTypeObject BurstSend_Type = FAST_METHOD_TYPE(
    BurstSend, "BurstSend", burstsend_new,
    "BurstSend(fallback, quick, encode, full, plain, count, limit, round_trip=False): a send method whose "
    "plain path (and, with round_trip, a Channel's reply) is in C; every other call goes to fallback.");

/* ----------------------------------------------------------------- LazyRecv */

enum { CORE, LAZY, FAILED };  /* LazyRecv's names */

/* names: the channel's protocol core (attribute), the core's iterator over
 * the batch being delivered or None (attribute), the channel's method given
 * the iterator's exception. extra: the Message class when the round trip
 * (rt_recv) is done here, else NULL. */
typedef FastMethod LazyRecv;

/* recv(self): the next value of the batch being delivered, if there is one;
 * anything else (no batch, its end, arguments) is the Python method's. */
static PyObject *
lazyrecv_vectorcall(LazyRecv *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *const *names = self->names;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || kwnames != NULL) {
        goto fallback;
    }
    PyObject *obj = args[0];
    PyObject *core = PyObject_GetAttr(obj, names[CORE]);
    if (core == NULL) {
        return NULL;
    }
    PyObject *lazy = PyObject_GetAttr(core, names[LAZY]);
    if (lazy == NULL) {
        Py_DECREF(core);
        return NULL;
    }
#if HAVE_ROUND_TRIP
    if (lazy == Py_None && self->extra != NULL) {
        Py_DECREF(lazy);
        PyObject *message = ipcbus_rt_recv(obj, core, (PyTypeObject *)self->extra);
        Py_DECREF(core);
        if (message != Py_None) {
            return message;  /* (or NULL) */
        }
        Py_DECREF(message);
        goto fallback;
    }
#endif
    Py_DECREF(core);
    if (lazy == Py_None || !PyIter_Check(lazy)) {
        Py_DECREF(lazy);
        goto fallback;
    }
    PyObject *message = Py_TYPE(lazy)->tp_iternext(lazy);
    Py_DECREF(lazy);
    if (message != NULL) {
        return message;
    }
    if (PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
            PyErr_Clear();
        }
        else if (PyErr_ExceptionMatches(PyExc_Exception)) {
            /* The decoder's error: the channel reports it (and fails). */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL && value != NULL) {
                PyException_SetTraceback(value, tb);
            }
            PyObject *result = PyObject_CallMethodOneArg(obj, names[FAILED], value ? value : Py_None);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            if (result == NULL) {
                return NULL;
            }
            Py_DECREF(result);
        }
        else {
            return NULL;  /* KeyboardInterrupt and the like */
        }
    }

fallback:
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *
lazyrecv_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fallback", "core", "lazy", "failed", "message", NULL};
    PyObject *fallback, *names[3];
    PyObject *message = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUUU|O:LazyRecv", kwlist, &fallback, &names[CORE], &names[LAZY],
                                     &names[FAILED], &message)) {
        return NULL;
    }
    if (message != Py_None && !message_class_ok(message)) {
        return NULL;
    }
    FastMethod *self = fastmethod_new(type, (vectorcallfunc)lazyrecv_vectorcall, fallback, names, 3);
    if (self != NULL && message != Py_None && HAVE_ROUND_TRIP) {
        Py_INCREF(message);
        self->extra = message;
    }
    return (PyObject *)self;
}

static PyTypeObject LazyRecv_Type = FAST_METHOD_TYPE(
    LazyRecv, "LazyRecv", lazyrecv_new,
    "LazyRecv(fallback, core, lazy, failed, message=None): a recv method that takes the next message of the "
    "batch being delivered (and, given the Message class, a Channel's round-trip read) in C; every other call "
    "goes to fallback.");

/* ----------------------------------------------------------------- Messages */

typedef struct {
    PyObject_HEAD
    PyObject *source;       /* an iterator of values */
    PyTypeObject *cls;      /* a tuple subclass without instance fields */
} Messages;

static int
messages_traverse(Messages *self, visitproc visit, void *arg)
{
    Py_VISIT(self->source);
    Py_VISIT(self->cls);
    return 0;
}

static int
messages_clear(Messages *self)
{
    Py_CLEAR(self->source);
    Py_CLEAR(self->cls);
    return 0;
}

static void
messages_dealloc(Messages *self)
{
    PyObject_GC_UnTrack(self);
    messages_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
messages_next(Messages *self)
{
    if (self->source == NULL) {
        return NULL;
    }
    PyObject *value = Py_TYPE(self->source)->tp_iternext(self->source);
    if (value == NULL) {
        return NULL;
    }
    return ipcbus_message(self->cls, value);
}

static PyObject *
messages_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *iterable;
    PyObject *cls;
    if (!PyArg_ParseTuple(args, "OO!:Messages", &iterable, &PyType_Type, &cls)) {
        return NULL;
    }
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "Messages takes no keyword arguments");
        return NULL;
    }
    PyTypeObject *tcls = (PyTypeObject *)cls;
    if (!message_class_ok(cls)) {
        return NULL;
    }
    PyObject *source = PyObject_GetIter(iterable);
    if (source == NULL) {
        return NULL;
    }
    Messages *self = (Messages *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(source);
        return NULL;
    }
    self->source = source;
    Py_INCREF(cls);
    self->cls = tcls;
    return (PyObject *)self;
}

static PyTypeObject Messages_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipcbus._speedups.Messages",
    .tp_doc = "Messages(values, cls): cls((value, None)) for each value, in C.",
    .tp_basicsize = sizeof(Messages),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = messages_new,
    .tp_dealloc = (destructor)messages_dealloc,
    .tp_traverse = (traverseproc)messages_traverse,
    .tp_clear = (inquiry)messages_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)messages_next,
};

/* ------------------------------------------------------------------- module */

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ipcbus._speedups",
    .m_doc = "Optional C versions of ipcbus's per-message hot paths (see ipcbus/_fastpath.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyTypeObject *types[] = {&BurstSend_Type, &LazyRecv_Type, &Messages_Type};
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (ipcbus_rt_init(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0) {
            Py_DECREF(module);
            return NULL;
        }
        const char *dot = strrchr(types[i]->tp_name, '.');
        Py_INCREF(types[i]);
        if (PyModule_AddObject(module, dot + 1, (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            Py_DECREF(module);
            return NULL;
        }
    }
    return module;
}
