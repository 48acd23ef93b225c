/* ipcbus._speedups: what its C files share (_speedups.c: the module and its
 * fast methods; _roundtrip.c: the round trip of a blocking Channel). */
#ifndef IPCBUS_SPEEDUPS_H
#define IPCBUS_SPEEDUPS_H

#include <Python.h>

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
