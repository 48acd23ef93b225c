/* ipcbus._speedups: what its C files share (_speedups.c: the module and its
 * fast methods; _roundtrip.c: the round trip of a blocking Channel;
 * _msgpack_pack.c and _msgpack_unpack.c: the msgpack codec's encoder and
 * decoders). */
#ifndef IPCBUS_SPEEDUPS_H
#define IPCBUS_SPEEDUPS_H

#include <Python.h>
#include <stddef.h>

#ifdef __linux__
#define HAVE_ROUND_TRIP 1
#else
#define HAVE_ROUND_TRIP 0
#endif

#if defined(__GNUC__)
#define IPCBUS_INTERNAL __attribute__((visibility("hidden")))
#else
#define IPCBUS_INTERNAL
#endif

/* cls((value, None)): a Message, for a cls that message_class_ok accepted
 * (filled like a tuple). Steals value, even on failure (NULL). */
static inline PyObject *
ipcbus_message(PyTypeObject *cls, PyObject *value)
{
    PyObject *message = cls->tp_alloc(cls, 2);
    if (message == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(message, 0, value);
    PyTuple_SET_ITEM(message, 1, Py_NewRef(Py_None));
    return message;
}

/* Interns the attribute names; adds ROUND_TRIP_NAMES and HAVE_ROUND_TRIP to
 * the module. 0, or -1 with an exception set. */
IPCBUS_INTERNAL int ipcbus_rt_init(PyObject *module);

/* A C callable that hands every call it does not handle itself to a Python
 * callable, its fallback (MsgpackPack, MsgpackUnpackb): the fields such a
 * type starts with, and the functions of its type (in _speedups.c). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fallback;
} FallbackCall;

/* type(fallback): a new one (of type's size, the rest zeroed) whose calls
 * go to call. */
IPCBUS_INTERNAL PyObject *ipcbus_fallback_new(PyTypeObject *type, PyObject *args, PyObject *kwargs,
                                              vectorcallfunc call);
IPCBUS_INTERNAL int ipcbus_fallback_traverse(PyObject *self, visitproc visit, void *arg);
IPCBUS_INTERNAL int ipcbus_fallback_clear(PyObject *self);
IPCBUS_INTERNAL void ipcbus_fallback_dealloc(PyObject *self);
IPCBUS_INTERNAL PyObject *ipcbus_fallback_repr(PyObject *self);

/* The type object of a FallbackCall kind (NEW: its tp_new, which calls
 * ipcbus_fallback_new with its vectorcall). */
#define FALLBACK_CALL_TYPE(NAME, DOC, SIZE, NEW, DEALLOC)                              \
    {                                                                                  \
        PyVarObject_HEAD_INIT(NULL, 0)                                                 \
        .tp_name = "ipcbus._speedups." NAME,                                           \
        .tp_doc = DOC,                                                                 \
        .tp_basicsize = SIZE,                                                          \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL, \
        .tp_vectorcall_offset = offsetof(FallbackCall, vectorcall),                    \
        .tp_call = PyVectorcall_Call,                                                  \
        .tp_new = NEW,                                                                 \
        .tp_dealloc = DEALLOC,                                                         \
        .tp_repr = ipcbus_fallback_repr,                                               \
        .tp_traverse = ipcbus_fallback_traverse,                                       \
        .tp_clear = ipcbus_fallback_clear,                                             \
    }

/* The msgpack codec's C parts, which the module adds: MsgpackPack
 * (_msgpack_pack.c), MsgpackUnpackb and MsgpackValues (_msgpack_unpack.c). */
IPCBUS_INTERNAL extern PyTypeObject ipcbus_MsgpackPack_Type;
IPCBUS_INTERNAL extern PyTypeObject ipcbus_MsgpackUnpackb_Type;
IPCBUS_INTERNAL extern PyTypeObject ipcbus_MsgpackValues_Type;

#if HAVE_ROUND_TRIP
/* Channel.send's reply, written here: 1 written, 0 not taken (nothing
 * done: the Python method runs), -1 an exception. The caller saw the
 * channel's burst list empty, holds a reference to its core, and payload
 * is exact bytes. */
IPCBUS_INTERNAL int ipcbus_rt_send(PyObject *channel, PyObject *core, PyObject *payload);

/* recv()'s round trip, with no batch being delivered: a new reference to a
 * Message (of cls), Py_None when not taken (the Python method runs), or
 * NULL with an exception set. */
IPCBUS_INTERNAL PyObject *ipcbus_rt_recv(PyObject *channel, PyObject *core, PyTypeObject *cls);
#endif

#endif /* IPCBUS_SPEEDUPS_H */
