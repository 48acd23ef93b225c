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
 *               without the generic tuple constructor per value, and reusing
 *               a recent Message that the caller has dropped).
 *   FrontSlots, CoreSlots
 *               bases of the frontends and of the native protocol core: the
 *               attributes the fast methods read on every call, in C fields
 *               (a lookup by name cost as much as the rest of the call).
 *   MsgpackPack, MsgpackUnpackb, MsgpackValues
 *               the msgpack codec's encoder, one-value decoder and batch
 *               decoder for the common types (_msgpack_pack.c,
 *               _msgpack_unpack.c), with msgpack itself as their fallback;
 *               FallbackCall, below, is what the first two share.
 *
 * The wrappers are descriptors with Py_TPFLAGS_METHOD_DESCRIPTOR, so that
 * ``channel.send(x)`` calls them without building a bound method.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

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

/* ------------------------------------------------------ FrontSlots, CoreSlots */

/* Bases whose instances keep, in C fields, what the fast methods read on
 * every call: a frontend's protocol core, burst list and encoder
 * (FrontSlots: _core, _quick, _fast_encode) and the core's iterator over the
 * batch being delivered (CoreSlots: _lazy). Looking them up by name cost
 * more than the rest of the call. To Python they are plain attributes
 * (member descriptors), as with __slots__. */

enum { SLOT_CORE, SLOT_QUICK, SLOT_ENCODE, N_SLOTS };  /* FrontSlots' fields */
enum { SLOT_LAZY };                                      /* CoreSlots' field */

/* Both types' instances: FrontSlots uses every field, CoreSlots the first. */
typedef struct {
    PyObject_HEAD
    PyObject *field[N_SLOTS];
} Slots;

#define SLOT(obj, i) (((Slots *)(obj))->field[i])

static int
slots_traverse(Slots *self, visitproc visit, void *arg)
{
    for (int i = 0; i < N_SLOTS; i++) {
        Py_VISIT(self->field[i]);
    }
    return 0;
}

static int
slots_clear(Slots *self)
{
    for (int i = 0; i < N_SLOTS; i++) {
        Py_CLEAR(self->field[i]);
    }
    return 0;
}

static void
slots_dealloc(Slots *self)
{
    PyObject_GC_UnTrack(self);
    slots_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define SLOT_MEMBER(NAME, I, DOC) {NAME, T_OBJECT_EX, offsetof(Slots, field) + (I) * sizeof(PyObject *), 0, DOC}

static PyMemberDef frontslots_members[] = {
    SLOT_MEMBER("_core", SLOT_CORE, "the protocol core"),
    SLOT_MEMBER("_quick", SLOT_QUICK, "the burst's list of encoded payloads"),
    SLOT_MEMBER("_fast_encode", SLOT_ENCODE, "the send path's encoder: value -> bytes"),
    {NULL},
};

static PyMemberDef coreslots_members[] = {
    SLOT_MEMBER("_lazy", SLOT_LAZY, "the iterator over the batch being delivered, or None"),
    {NULL},
};

#define SLOTS_TYPE(NAME, MEMBERS, DOC)                                                       \
    {                                                                                        \
        PyVarObject_HEAD_INIT(NULL, 0)                                                       \
        .tp_name = "ipcbus._speedups." NAME,                                                 \
        .tp_doc = DOC,                                                                       \
        .tp_basicsize = sizeof(Slots),                                                       \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,           \
        .tp_new = PyType_GenericNew,                                                         \
        .tp_dealloc = (destructor)slots_dealloc,                                             \
        .tp_traverse = (traverseproc)slots_traverse,                                         \
        .tp_clear = (inquiry)slots_clear,                                                    \
        .tp_members = MEMBERS,                                                               \
    }

static PyTypeObject FrontSlots_Type = SLOTS_TYPE(
    "FrontSlots", frontslots_members,
    "A frontend's base: _core, _quick and _fast_encode, in C fields that the fast methods read.");
static PyTypeObject CoreSlots_Type = SLOTS_TYPE(
    "CoreSlots", coreslots_members, "A protocol core's base: _lazy, in a C field that LazyRecv reads.");

/* ---------------------------------------------------------------- BurstSend */

enum { FULL, PLAIN };  /* BurstSend's names */

typedef struct {
    FastMethod base;     /* names: the method called once the burst list holds
                          * `count`, the method given a payload the list refuses.
                          * The instance is a FrontSlots (others: the Python
                          * method), with the list (_quick) and encoder (_fast_encode). */
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
    if (nargs != 2 || kwnames != NULL || !PyObject_TypeCheck(args[0], &FrontSlots_Type)) {
        goto fallback;
    }
    PyObject *obj = args[0];
    PyObject *quick = SLOT(obj, SLOT_QUICK);
    PyObject *encode = SLOT(obj, SLOT_ENCODE);
    if (quick == NULL || encode == NULL || !PyList_CheckExact(quick)) {
        goto fallback;
    }
    /* (References of our own: the encoder may run anything.) */
    Py_INCREF(quick);
    Py_INCREF(encode);
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
        PyObject *core = SLOT(obj, SLOT_CORE);
        if (self->round_trip && core != NULL && PyList_GET_SIZE(quick) == 0 && PyBytes_CheckExact(payload)) {
            Py_INCREF(core);  /* (ours: what runs there may replace the channel's) */
            int sent = ipcbus_rt_send(obj, core, payload);
            Py_DECREF(core);
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
    static char *kwlist[] = {"fallback", "full", "plain", "count", "limit", "round_trip", NULL};
    PyObject *fallback, *names[2];
    Py_ssize_t count, limit;
    int round_trip = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUUnn|p:BurstSend", kwlist, &fallback, &names[FULL],
                                     &names[PLAIN], &count, &limit, &round_trip)) {
        return NULL;
    }
    BurstSend *self = (BurstSend *)fastmethod_new(type, (vectorcallfunc)burstsend_vectorcall, fallback, names, 2);
    if (self != NULL) {
        self->count = count;
        self->limit = limit;
        self->round_trip = round_trip && HAVE_ROUND_TRIP;
    }
    return (PyObject *)self;
}

static PyTypeObject BurstSend_Type = FAST_METHOD_TYPE(
    BurstSend, "BurstSend", burstsend_new,
    "BurstSend(fallback, full, plain, count, limit, round_trip=False): a send method whose "
    "plain path (and, with round_trip, a Channel's reply) is in C; every other call goes to fallback.");

/* ----------------------------------------------------------------- LazyRecv */

enum { FAILED };  /* LazyRecv's name */

/* names: the channel's method given the batch iterator's exception. extra:
 * the Message class when the round trip (rt_recv) is done here, else NULL.
 * The instance is a FrontSlots whose core is a CoreSlots (other instances:
 * the Python method). */
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
    if (!PyObject_TypeCheck(obj, &FrontSlots_Type)) {
        goto fallback;
    }
    PyObject *core = SLOT(obj, SLOT_CORE);
    if (core == NULL || !PyObject_TypeCheck(core, &CoreSlots_Type) || SLOT(core, SLOT_LAZY) == NULL) {
        goto fallback;
    }
    /* (References of our own: what runs below may replace either.) */
    Py_INCREF(core);
    PyObject *lazy = Py_NewRef(SLOT(core, SLOT_LAZY));
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
    static char *kwlist[] = {"fallback", "failed", "message", NULL};
    PyObject *fallback, *names[1];
    PyObject *message = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OU|O:LazyRecv", kwlist, &fallback, &names[FAILED], &message)) {
        return NULL;
    }
    if (message != Py_None && !message_class_ok(message)) {
        return NULL;
    }
    FastMethod *self = fastmethod_new(type, (vectorcallfunc)lazyrecv_vectorcall, fallback, names, 1);
    if (self != NULL && message != Py_None && HAVE_ROUND_TRIP) {
        Py_INCREF(message);
        self->extra = message;
    }
    return (PyObject *)self;
}

static PyTypeObject LazyRecv_Type = FAST_METHOD_TYPE(
    LazyRecv, "LazyRecv", lazyrecv_new,
    "LazyRecv(fallback, failed, message=None): a recv method that takes the next message of the "
    "batch being delivered (and, given the Message class, a Channel's round-trip read) in C; every other call "
    "goes to fallback.");

/* ----------------------------------------------------------------- Messages */

typedef struct {
    PyObject_HEAD
    PyObject *source;       /* an iterator of values */
    PyTypeObject *cls;      /* a tuple subclass without instance fields */
    PyObject *recent[2];    /* the Messages returned last (the newest second), or NULLs */
} Messages;

#define RECENT 2

static int
messages_traverse(Messages *self, visitproc visit, void *arg)
{
    Py_VISIT(self->source);
    Py_VISIT(self->cls);
    Py_VISIT(self->recent[0]);
    Py_VISIT(self->recent[1]);
    return 0;
}

static int
messages_clear(Messages *self)
{
    Py_CLEAR(self->source);
    Py_CLEAR(self->cls);
    Py_CLEAR(self->recent[0]);
    Py_CLEAR(self->recent[1]);
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
        /* (Their values live on in the caller's hands, if anywhere.) */
        Py_CLEAR(self->recent[0]);
        Py_CLEAR(self->recent[1]);
        return NULL;
    }
    for (int i = 0; i < RECENT; i++) {
        PyObject *message = self->recent[i];
        if (message == NULL || Py_REFCNT(message) != 1) {
            continue;
        }
        /* Nobody holds this Message any more: it becomes the next one, as
         * zip() reuses its result tuple (a heap type's instance costs a GC
         * allocation and subtype_dealloc; this costs a swap). Two are kept
         * because `msg = recv()` still holds the previous one during the
         * call. The reference taken first keeps it ours while the old
         * value's release runs whatever it runs (a recv() from there gets
         * a new Message), and the order is settled before that. */
        Py_INCREF(message);
        if (i == 0) {
            self->recent[0] = self->recent[1];
            self->recent[1] = message;  /* (the reference recent[0] held) */
        }
        PyObject *old = PyTuple_GET_ITEM(message, 0);
        PyTuple_SET_ITEM(message, 0, value);
        if (!PyObject_GC_IsTracked(message)) {
            PyObject_GC_Track(message);
        }
        Py_DECREF(old);
        return message;
    }
    PyObject *message = ipcbus_message(self->cls, value);
    if (message == NULL) {
        return NULL;
    }
    PyObject *oldest = self->recent[0];
    self->recent[0] = self->recent[1];
    self->recent[1] = Py_NewRef(message);
    Py_XDECREF(oldest);  /* (last: it may run anything) */
    return message;
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

/* ------------------------------------------------------------- FallbackCall */

PyObject *
ipcbus_fallback_new(PyTypeObject *type, PyObject *args, PyObject *kwargs, vectorcallfunc call)
{
    static char *kwlist[] = {"fallback", NULL};
    PyObject *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O", kwlist, &fallback)) {
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_Format(PyExc_TypeError, "%s: fallback must be callable", type->tp_name);
        return NULL;
    }
    FallbackCall *self = (FallbackCall *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->vectorcall = call;
        self->fallback = Py_NewRef(fallback);
    }
    return (PyObject *)self;
}

int
ipcbus_fallback_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((FallbackCall *)self)->fallback);
    return 0;
}

int
ipcbus_fallback_clear(PyObject *self)
{
    Py_CLEAR(((FallbackCall *)self)->fallback);
    return 0;
}

void
ipcbus_fallback_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    ipcbus_fallback_clear(self);
    Py_TYPE(self)->tp_free(self);
}

PyObject *
ipcbus_fallback_repr(PyObject *self)
{
    return PyUnicode_FromFormat("<%s of %R>", Py_TYPE(self)->tp_name, ((FallbackCall *)self)->fallback);
}

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
    PyTypeObject *types[] = {
        &BurstSend_Type, &LazyRecv_Type, &Messages_Type, &FrontSlots_Type, &CoreSlots_Type,
        &ipcbus_MsgpackPack_Type, &ipcbus_MsgpackUnpackb_Type, &ipcbus_MsgpackValues_Type,
    };
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
