/* ipcbus._speedups: the round trip of a blocking Channel (_roundtrip.c). */
#ifndef IPCBUS_ROUNDTRIP_H
#define IPCBUS_ROUNDTRIP_H

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

/* Interns the attribute names; adds ROUND_TRIP_NAMES and HAVE_ROUND_TRIP to
 * the module. 0, or -1 with an exception set. */
IPCBUS_INTERNAL int ipcbus_rt_init(PyObject *module);

#if HAVE_ROUND_TRIP
/* Channel.send's reply, written here: 1 written, 0 not taken (nothing
 * done: the Python method runs), -1 an exception. The caller saw the
 * channel's burst list empty and payload is exact bytes. */
IPCBUS_INTERNAL int ipcbus_rt_send(PyObject *channel, PyObject *payload);

/* recv()'s round trip, with no batch being delivered: a new reference to a
 * Message (of cls), Py_None when not taken (the Python method runs), or
 * NULL with an exception set. */
IPCBUS_INTERNAL PyObject *ipcbus_rt_recv(PyObject *channel, PyObject *core, PyTypeObject *cls);
#endif

#endif /* IPCBUS_ROUNDTRIP_H */
