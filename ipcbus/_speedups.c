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

/* ------------------------------------------------------------------ shared */

typedef struct {
    PyObject_HEAD
    PyObject *fallback;   /* the Python function: every other case */
    PyObject *dict;       /* __doc__, __name__, __wrapped__ (functools.wraps) */
    vectorcallfunc vectorcall;
} FastMethod;

static int
fastmethod_traverse(FastMethod *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    Py_VISIT(self->dict);
    return 0;
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

static PyGetSetDef fastmethod_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict},
    {NULL},
};

/* ---------------------------------------------------------------- BurstSend */

typedef struct {
    FastMethod base;
    PyObject *quick_name;   /* attribute: the burst's list of payloads */
    PyObject *encode_name;  /* attribute: value -> bytes */
    PyObject *full_name;    /* method called once the list holds `count` */
    PyObject *plain_name;   /* method(payload): a payload the list refuses */
    Py_ssize_t count;
    Py_ssize_t limit;       /* largest payload the list takes */
} BurstSend;

static int
burstsend_clear(BurstSend *self)
{
    Py_CLEAR(self->base.fallback);
    Py_CLEAR(self->base.dict);
    Py_CLEAR(self->quick_name);
    Py_CLEAR(self->encode_name);
    Py_CLEAR(self->full_name);
    Py_CLEAR(self->plain_name);
    return 0;
}

static void
burstsend_dealloc(BurstSend *self)
{
    PyObject_GC_UnTrack(self);
    burstsend_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* send(self, data): while a burst is being collected (the list is not
 * empty), encode and append; anything else is the Python method's. */
static PyObject *
burstsend_vectorcall(BurstSend *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || kwnames != NULL) {
        goto fallback;
    }
    PyObject *obj = args[0];
    PyObject *quick = PyObject_GetAttr(obj, self->quick_name);
    if (quick == NULL) {
        return NULL;
    }
    if (!PyList_CheckExact(quick) || PyList_GET_SIZE(quick) == 0) {
        Py_DECREF(quick);
        goto fallback;
    }
    PyObject *encode = PyObject_GetAttr(obj, self->encode_name);
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
    if (!PyBytes_CheckExact(payload) || PyBytes_GET_SIZE(payload) > self->limit) {
        Py_DECREF(quick);
        PyObject *result = PyObject_CallMethodOneArg(obj, self->plain_name, payload);
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
        PyObject *result = PyObject_CallMethodNoArgs(obj, self->full_name);
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
    static char *kwlist[] = {"fallback", "quick", "encode", "full", "plain", "count", "limit", NULL};
    PyObject *fallback, *quick_name, *encode_name, *full_name, *plain_name;
    Py_ssize_t count, limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUUUUnn:BurstSend", kwlist, &fallback, &quick_name,
                                     &encode_name, &full_name, &plain_name, &count, &limit)) {
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "BurstSend: fallback must be callable");
        return NULL;
    }
    BurstSend *self = (BurstSend *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->base.vectorcall = (vectorcallfunc)burstsend_vectorcall;
    Py_INCREF(fallback);
    self->base.fallback = fallback;
    Py_INCREF(quick_name);
    PyUnicode_InternInPlace(&quick_name);
    self->quick_name = quick_name;
    Py_INCREF(encode_name);
    PyUnicode_InternInPlace(&encode_name);
    self->encode_name = encode_name;
    Py_INCREF(full_name);
    PyUnicode_InternInPlace(&full_name);
    self->full_name = full_name;
    Py_INCREF(plain_name);
    PyUnicode_InternInPlace(&plain_name);
    self->plain_name = plain_name;
    self->count = count;
    self->limit = limit;
    return (PyObject *)self;
}

static int
burstsend_traverse(BurstSend *self, visitproc visit, void *arg)
{
    return fastmethod_traverse(&self->base, visit, arg);
}

static PyTypeObject BurstSend_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipcbus._speedups.BurstSend",
    .tp_doc = "BurstSend(fallback, quick, encode, full, plain, count, limit): a send method whose "
              "burst path is in C; every other call goes to fallback.",
    .tp_basicsize = sizeof(BurstSend),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = burstsend_new,
    .tp_dealloc = (destructor)burstsend_dealloc,
    .tp_traverse = (traverseproc)burstsend_traverse,
    .tp_clear = (inquiry)burstsend_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FastMethod, vectorcall),
    .tp_descr_get = fastmethod_get,
    .tp_dictoffset = offsetof(FastMethod, dict),
    .tp_getset = fastmethod_getset,
};

/* ----------------------------------------------------------------- LazyRecv */

typedef struct {
    FastMethod base;
    PyObject *core_name;    /* attribute of the channel: its protocol core */
    PyObject *lazy_name;    /* attribute of the core: the batch's iterator, or None */
    PyObject *failed_name;  /* method(exc): the iterator raised */
} LazyRecv;

static int
lazyrecv_clear(LazyRecv *self)
{
    Py_CLEAR(self->base.fallback);
    Py_CLEAR(self->base.dict);
    Py_CLEAR(self->core_name);
    Py_CLEAR(self->lazy_name);
    Py_CLEAR(self->failed_name);
    return 0;
}

static void
lazyrecv_dealloc(LazyRecv *self)
{
    PyObject_GC_UnTrack(self);
    lazyrecv_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* recv(self): the next value of the batch being delivered, if there is one;
 * anything else (no batch, its end, arguments) is the Python method's. */
static PyObject *
lazyrecv_vectorcall(LazyRecv *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || kwnames != NULL) {
        goto fallback;
    }
    PyObject *obj = args[0];
    PyObject *core = PyObject_GetAttr(obj, self->core_name);
    if (core == NULL) {
        return NULL;
    }
    PyObject *lazy = PyObject_GetAttr(core, self->lazy_name);
    Py_DECREF(core);
    if (lazy == NULL) {
        return NULL;
    }
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
            PyObject *result = PyObject_CallMethodOneArg(obj, self->failed_name, value ? value : Py_None);
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
    return PyObject_Vectorcall(self->base.fallback, args, nargsf, kwnames);
}

static PyObject *
lazyrecv_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fallback", "core", "lazy", "failed", NULL};
    PyObject *fallback, *core_name, *lazy_name, *failed_name;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUUU:LazyRecv", kwlist, &fallback, &core_name, &lazy_name,
                                     &failed_name)) {
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "LazyRecv: fallback must be callable");
        return NULL;
    }
    LazyRecv *self = (LazyRecv *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->base.vectorcall = (vectorcallfunc)lazyrecv_vectorcall;
    Py_INCREF(fallback);
    self->base.fallback = fallback;
    Py_INCREF(core_name);
    PyUnicode_InternInPlace(&core_name);
    self->core_name = core_name;
    Py_INCREF(lazy_name);
    PyUnicode_InternInPlace(&lazy_name);
    self->lazy_name = lazy_name;
    Py_INCREF(failed_name);
    PyUnicode_InternInPlace(&failed_name);
    self->failed_name = failed_name;
    return (PyObject *)self;
}

static int
lazyrecv_traverse(LazyRecv *self, visitproc visit, void *arg)
{
    return fastmethod_traverse(&self->base, visit, arg);
}

static PyTypeObject LazyRecv_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ipcbus._speedups.LazyRecv",
    .tp_doc = "LazyRecv(fallback, core, lazy, failed): a recv method that takes the next message of "
              "the batch being delivered in C; every other call goes to fallback.",
    .tp_basicsize = sizeof(LazyRecv),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = lazyrecv_new,
    .tp_dealloc = (destructor)lazyrecv_dealloc,
    .tp_traverse = (traverseproc)lazyrecv_traverse,
    .tp_clear = (inquiry)lazyrecv_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FastMethod, vectorcall),
    .tp_descr_get = fastmethod_get,
    .tp_dictoffset = offsetof(FastMethod, dict),
    .tp_getset = fastmethod_getset,
};

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
    PyTypeObject *cls = self->cls;
    PyObject *message = cls->tp_alloc(cls, 2);
    if (message == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(message, 0, value);
    Py_INCREF(Py_None);
    PyTuple_SET_ITEM(message, 1, Py_None);
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
    /* Filled like a tuple: a tuple subclass that adds no fields (a named
     * tuple: __slots__ = ()). */
    if (!PyType_IsSubtype(tcls, &PyTuple_Type) || tcls->tp_basicsize != PyTuple_Type.tp_basicsize
        || tcls->tp_itemsize != PyTuple_Type.tp_itemsize || tcls->tp_dictoffset != 0) {
        PyErr_SetString(PyExc_TypeError, "Messages: cls must be a tuple subclass with __slots__ = ()");
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
