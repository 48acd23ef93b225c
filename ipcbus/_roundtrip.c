/* ipcbus._speedups, the round trip: a blocking Channel's reply written, and
 * recv's round-trip read done and parsed, in C (Linux; the module's
 * BurstSend and LazyRecv call these when made with round_trip / a Message
 * class).
 *
 * The Python twins are Channel._send_plain's lone branch with _write_lone,
 * and Channel.recv's round-trip path with Connection.lone_message
 * (ipcbus/_channel.py, ipcbus/_protocol.py). Each function here handles the
 * common case only and returns "not taken" (nothing done) for every other,
 * so that the Python code runs and meets whatever made it different: a read
 * or write that failed is done again there and reported as it reports it;
 * a read that is not one plain frame for the application is handed to
 * Channel._read_done. Why C: in a ping-pong each side's CPU time per message
 * comes back several times over in the round trip's latency (the other side
 * wakes later), and the Python lines of these two paths cost as much as the
 * system calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_speedups.h"

#if HAVE_ROUND_TRIP
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#endif

/* The attributes the round trip reads and writes, by name: a Channel's
 * (ipcbus/_channel.py) and its Connection's (ipcbus/_protocol.py). Exported
 * as ROUND_TRIP_NAMES, which tests/test_round_trip.py checks against a live
 * channel; a rename that misses this list fails there and in every round
 * trip (an AttributeError, never a silent difference). */
enum {
    /* Channel */
    RT_FD, RT_CLOSED, RT_PARTIAL, RT_QUICK, RT_READ_SINCE_WRITE, RT_LAST_WRITE,
    RT_RLOCK_ACQUIRE, RT_RLOCK_RELEASE, RT_WLOCK_ACQUIRE, RT_WLOCK_RELEASE,
    RT_READ_DONE, RT_READ_DONE_ANCILLARY, RT_WROTE_LONE,
    /* Connection */
    RT_EVENTS, RT_STATE, RT_OUT, RT_PENDING, RT_BIG, RT_BUF, RT_FDS, RT_MAX_MESSAGE_SIZE,
    RT_DECODE, RT_PREFIXES, RT_CONSUMED, RT_ERROR, RT_CLOSED_FOR_SENDING,
    RT_HELD, RT_SEND_LIMIT, RT_HRUN,
    /* a message's key, the core's open state */
    RT_CMD, RT_OPEN,
    RT_NAMES
};
#define RT_FIRST_CORE_NAME RT_EVENTS
#define RT_FIRST_OTHER_NAME RT_CMD

static const char *const rt_text[RT_NAMES] = {
    "_rt_fd", "_closed", "_partial", "_quick", "_read_since_write", "_last_write",
    "_rlock_acquire", "_rlock_release", "_wlock_acquire", "_wlock_release",
    "_read_done", "_read_done_ancillary", "_wrote_lone",
    "_events", "_state", "_out", "_pending", "_big", "_buf", "_fds", "max_message_size",
    "_decode", "_prefixes", "_consumed", "_error", "_closed_for_sending",
    "_held", "_send_limit", "_hrun",
    "cmd", "OPEN",
};
static PyObject *rt_name[RT_NAMES];

int
ipcbus_rt_init(PyObject *module)
{
    for (int i = 0; i < RT_NAMES; i++) {
        if (rt_name[i] == NULL && (rt_name[i] = PyUnicode_InternFromString(rt_text[i])) == NULL) {
            return -1;
        }
    }
    /* ROUND_TRIP_NAMES: ((owner, name), ...) of the attributes read by name. */
    PyObject *names = PyTuple_New(RT_FIRST_OTHER_NAME);
    if (names == NULL) {
        return -1;
    }
    for (int i = 0; i < RT_FIRST_OTHER_NAME; i++) {
        PyObject *item = Py_BuildValue("(sO)", i < RT_FIRST_CORE_NAME ? "channel" : "core", rt_name[i]);
        if (item == NULL) {
            Py_DECREF(names);
            return -1;
        }
        PyTuple_SET_ITEM(names, i, item);
    }
    if (PyModule_AddObject(module, "ROUND_TRIP_NAMES", names) < 0) {
        Py_DECREF(names);
        return -1;
    }
    return PyModule_AddIntConstant(module, "HAVE_ROUND_TRIP", HAVE_ROUND_TRIP);
}

#if HAVE_ROUND_TRIP

/* What one read asks for (SocketStream.receive's SMALL_READ), and the
 * largest reply written here (larger ones take the Python path). */
#define RT_READ_SIZE (64 * 1024)
#define RT_WRITE_MAX (64 * 1024)
#define RT_MAX_FDS 253  /* SCM_MAX_FD */
#define FRAME_HEADER 8

/* Each check: 1 when it holds, 0 when not, -1 with an exception set. */
static int
rt_is(PyObject *obj, int name, PyObject *expected)
{
    PyObject *value = PyObject_GetAttr(obj, rt_name[name]);
    if (value == NULL) {
        return -1;
    }
    int same = value == expected;
    Py_DECREF(value);
    return same;
}

static int
rt_empty(PyObject *obj, int name)
{
    PyObject *value = PyObject_GetAttr(obj, rt_name[name]);
    if (value == NULL) {
        return -1;
    }
    Py_ssize_t size = PyObject_Length(value);
    Py_DECREF(value);
    return size < 0 ? -1 : size == 0;
}

/* obj.<name> as a Py_ssize_t; -1 with an exception set on failure. */
static Py_ssize_t
rt_ssize(PyObject *obj, int name)
{
    PyObject *value = PyObject_GetAttr(obj, rt_name[name]);
    if (value == NULL) {
        return -1;
    }
    Py_ssize_t n = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return n;
}

static int
rt_set(PyObject *obj, int name, PyObject *value)
{
    return PyObject_SetAttr(obj, rt_name[name], value);
}

/* Steals value. */
static int
rt_set_new(PyObject *obj, int name, PyObject *value)
{
    if (value == NULL) {
        return -1;
    }
    int failed = PyObject_SetAttr(obj, rt_name[name], value);
    Py_DECREF(value);
    return failed;
}

#define RT_CHECK(test)        \
    do {                      \
        int held_ = (test);   \
        if (held_ <= 0) {     \
            return held_;     \
        }                     \
    } while (0)

/* channel.<acquire>(False): 1 when taken, 0 when another thread holds it. */
static int
rt_try_lock(PyObject *ch, int acquire)
{
    PyObject *got = PyObject_CallMethodOneArg(ch, rt_name[acquire], Py_False);
    if (got == NULL) {
        return -1;
    }
    int taken = PyObject_IsTrue(got);
    Py_DECREF(got);
    return taken;
}

/* channel.<release>(), keeping the exception already set (if any, the one
 * to see): 0, or -1 when the release itself failed. */
static int
rt_release(PyObject *ch, int release)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *done = PyObject_CallMethodNoArgs(ch, rt_name[release]);
    if (done == NULL && type != NULL) {
        PyErr_Clear();
    }
    if (type != NULL || done != NULL) {
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* rt_release, for a function's result (a new reference, or NULL). */
static PyObject *
rt_unlock(PyObject *ch, int release, PyObject *result)
{
    if (rt_release(ch, release) < 0) {
        Py_XDECREF(result);
        return NULL;
    }
    return result;
}

/* The channel's fd (its _rt_fd), read just before a system call on it, as
 * the socket object does: -1 once the channel is closing (or never). */
static int
rt_fd(PyObject *ch)
{
    Py_ssize_t fd = rt_ssize(ch, RT_FD);
    if (fd == -1 && PyErr_Occurred()) {
        return -2;
    }
    return fd < 0 || fd > INT_MAX ? -1 : (int)fd;
}

/* time.monotonic(): CLOCK_MONOTONIC on Linux, converted as CPython does. */
static PyObject *
rt_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return PyFloat_FromDouble((double)((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9);
}

/* ---- the reply: Channel._send_plain's lone branch and _write_lone */

/* A reply nobody else is writing: the frame straight from here, past the
 * core's queue, as _write_lone does (core.direct_header's checks included).
 * The caller saw the burst list empty. 1: written (whole, or the rest left
 * to _wrote_lone); 0: not taken, nothing done (the Python method runs, and
 * meets any error the write met); -1: an exception. */
static int
rt_send_ready(PyObject *ch, PyObject *core, Py_ssize_t size)
{
    RT_CHECK(rt_is(ch, RT_READ_SINCE_WRITE, Py_True));  /* a reply: lone */
    RT_CHECK(rt_is(ch, RT_CLOSED, Py_False));
    RT_CHECK(rt_is(ch, RT_PARTIAL, Py_None));
    RT_CHECK(rt_is(core, RT_ERROR, Py_None));
    RT_CHECK(rt_is(core, RT_CLOSED_FOR_SENDING, Py_False));
    RT_CHECK(rt_empty(core, RT_OUT));
    RT_CHECK(rt_empty(core, RT_PENDING));
    RT_CHECK(rt_is(core, RT_HELD, Py_None));
    Py_ssize_t limit = rt_ssize(core, RT_SEND_LIMIT);
    if (limit == -1 && PyErr_Occurred()) {
        return -1;
    }
    return size <= limit;  /* larger: the Python method raises the CodecError */
}

/* The write, under the writer's lock: 1, 0 or -1 as rt_send. */
static int
rt_write(PyObject *ch, PyObject *core, PyObject *payload)
{
    RT_CHECK(rt_is(ch, RT_PARTIAL, Py_None));  /* again, now that we write */
    int fd = rt_fd(ch);
    if (fd < 0) {
        return fd == -1 ? 0 : -1;
    }
    if (rt_set(core, RT_HRUN, Py_None) < 0) {  /* as direct_header does */
        return -1;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(payload);
    unsigned char header[FRAME_HEADER] = {
        (unsigned char)(size >> 24), (unsigned char)(size >> 16), (unsigned char)(size >> 8), (unsigned char)size,
        0, 0, 0, 0,  /* a DATA frame, no handles */
    };
    struct iovec iov[2] = {{header, FRAME_HEADER}, {PyBytes_AS_STRING(payload), (size_t)size}};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    ssize_t n;
    int err;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        n = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0 || err != EINTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            return -1;
        }
    }
    if (n < 0) {
        return 0;  /* EAGAIN, EPIPE...: _write_lone writes again and handles it */
    }
    if (n < FRAME_HEADER + size) {
        /* Part of it: the rest is queued as _write_lone queues it. */
        PyObject *frame = PyBytes_FromStringAndSize(NULL, FRAME_HEADER + size);
        if (frame == NULL) {
            return -1;
        }
        memcpy(PyBytes_AS_STRING(frame), header, FRAME_HEADER);
        memcpy(PyBytes_AS_STRING(frame) + FRAME_HEADER, PyBytes_AS_STRING(payload), size);
        PyObject *written = PyLong_FromSsize_t(n);
        PyObject *done = written ? PyObject_CallMethodObjArgs(ch, rt_name[RT_WROTE_LONE], frame, written, NULL)
                                 : NULL;
        Py_DECREF(frame);
        Py_XDECREF(written);
        if (done == NULL) {
            return -1;
        }
        Py_DECREF(done);
        return 1;
    }
    if (rt_set_new(ch, RT_LAST_WRITE, rt_monotonic()) < 0 || rt_set(ch, RT_READ_SINCE_WRITE, Py_False) < 0) {
        return -1;
    }
    return 1;
}

int
ipcbus_rt_send(PyObject *ch, PyObject *core, PyObject *payload)
{
    Py_ssize_t size = PyBytes_GET_SIZE(payload);
    if (size > RT_WRITE_MAX) {
        return 0;
    }
    int fd = rt_fd(ch);  /* (a channel that has none: the cheapest way out) */
    if (fd < 0) {
        return fd == -1 ? 0 : -1;
    }
    int sent = rt_send_ready(ch, core, size);
    if (sent > 0) {
        sent = rt_try_lock(ch, RT_WLOCK_ACQUIRE);
        if (sent > 0) {
            sent = rt_write(ch, core, payload);
            if (rt_release(ch, RT_WLOCK_RELEASE) < 0) {
                sent = -1;
            }
        }
    }
    return sent;
}

/* ---- the answer: recv's round-trip path and Connection.lone_message */

/* The read's one plain frame for the application, parsed as lone_message
 * does (its checks on the core's buffers were made before the read). A new
 * reference: the Message, Py_None when it is not that (nothing consumed:
 * _read_done sees the read whole), or NULL. */
static PyObject *
rt_lone_message(PyObject *core, const char *buf, Py_ssize_t n, PyTypeObject *cls)
{
    const unsigned char *h = (const unsigned char *)buf;
    Py_ssize_t length = ((Py_ssize_t)h[0] << 24) | ((Py_ssize_t)h[1] << 16) | ((Py_ssize_t)h[2] << 8) | h[3];
    if (length + FRAME_HEADER != n || h[4] || h[5] || h[6] || h[7]) {
        Py_RETURN_NONE;
    }
    int open = rt_is(core, RT_STATE, rt_name[RT_OPEN]);
    if (open <= 0) {
        return open < 0 ? NULL : Py_NewRef(Py_None);
    }
    Py_ssize_t limit = rt_ssize(core, RT_MAX_MESSAGE_SIZE);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (length > limit) {
        Py_RETURN_NONE;
    }
    PyObject *payload = PyBytes_FromStringAndSize(buf + FRAME_HEADER, length);
    if (payload == NULL) {
        return NULL;
    }
    /* (The core's own decoder: with the accelerator, which the round trip
     * needs, the msgpack codec's is MsgpackUnpackb.) */
    PyObject *value = NULL;
    PyObject *decode = PyObject_GetAttr(core, rt_name[RT_DECODE]);
    if (decode == NULL) {
        goto error;
    }
    value = PyObject_CallOneArg(decode, payload);
    Py_DECREF(decode);
    if (value == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            goto error;
        }
        /* lone_message decodes it again, and raises or declines as the
         * codec's error says. */
        PyErr_Clear();
        Py_DECREF(payload);
        Py_RETURN_NONE;
    }
    Py_CLEAR(payload);
    if (PyDict_CheckExact(value)) {
        /* An internal message (a prefix of the core's) is the core's. */
        PyObject *cmd = PyDict_GetItemWithError(value, rt_name[RT_CMD]);
        if (cmd == NULL && PyErr_Occurred()) {
            goto error;
        }
        if (cmd != NULL && PyUnicode_CheckExact(cmd)) {
            PyObject *prefixes = PyObject_GetAttr(core, rt_name[RT_PREFIXES]);
            if (prefixes == NULL) {
                goto error;
            }
            Py_ssize_t match = 0;
            if (!PyTuple_CheckExact(prefixes)) {
                match = 1;  /* not the tuple of str it always is: lone_message decides */
            }
            for (Py_ssize_t i = 0; !match && i < PyTuple_GET_SIZE(prefixes); i++) {
                PyObject *prefix = PyTuple_GET_ITEM(prefixes, i);
                match = PyUnicode_Check(prefix) ? PyUnicode_Tailmatch(cmd, prefix, 0, PY_SSIZE_T_MAX, -1) : 1;
            }
            Py_DECREF(prefixes);
            if (match < 0) {
                goto error;
            }
            if (match) {
                Py_DECREF(value);
                Py_RETURN_NONE;
            }
        }
    }
    PyObject *consumed = PyObject_GetAttr(core, rt_name[RT_CONSUMED]);
    if (consumed == NULL) {
        goto error;
    }
    PyObject *count = PyLong_FromSsize_t(n);
    PyObject *sum = count ? PyNumber_Add(consumed, count) : NULL;
    Py_DECREF(consumed);
    Py_XDECREF(count);
    if (rt_set_new(core, RT_CONSUMED, sum) < 0) {
        goto error;
    }
    return ipcbus_message(cls, value);

error:
    Py_XDECREF(value);
    Py_XDECREF(payload);
    return NULL;
}

/* recvmsg's control data as socket.recvmsg returns it: [(level, type, data)],
 * each item's data clipped to what arrived (MSG_CTRUNC). */
static PyObject *
rt_ancillary(struct msghdr *msg)
{
    PyObject *list = PyList_New(0);
    if (list == NULL || msg->msg_controllen == 0) {
        return list;
    }
    const char *end = (const char *)msg->msg_control + msg->msg_controllen;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_len < CMSG_LEN(0)) {
            break;
        }
        const char *data = (const char *)CMSG_DATA(c);
        Py_ssize_t size = (Py_ssize_t)(c->cmsg_len - CMSG_LEN(0));
        if (data + size > end) {
            size = data < end ? (Py_ssize_t)(end - data) : 0;
        }
        PyObject *item = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type, data, size);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

/* Conditions of recv's round-trip path, the reader's lock held: 1 when the
 * read may be done here, 0 when not, -1 on error. *lone: whether a frame
 * read may be parsed here (nothing of the stream buffered before it). */
static int
rt_recv_ready(PyObject *ch, PyObject *core, int *lone)
{
    RT_CHECK(rt_empty(ch, RT_QUICK));
    RT_CHECK(rt_is(ch, RT_PARTIAL, Py_None));
    RT_CHECK(rt_empty(core, RT_OUT));
    RT_CHECK(rt_empty(core, RT_PENDING));
    RT_CHECK(rt_empty(core, RT_EVENTS));
    RT_CHECK(rt_is(core, RT_BIG, Py_None));
    int empty = rt_empty(core, RT_BUF);
    if (empty > 0) {
        empty = rt_empty(core, RT_FDS);
    }
    if (empty < 0) {
        return -1;
    }
    *lone = empty;
    return 1;
}

/* The read, the reader's lock held: a Message, Py_None (the Python method
 * runs) or NULL. */
static PyObject *
rt_read(PyObject *ch, PyObject *core, PyTypeObject *cls)
{
    int lone = 0;
    int ready = rt_recv_ready(ch, core, &lone);
    if (ready <= 0) {
        return ready < 0 ? NULL : Py_NewRef(Py_None);
    }
    int fd = rt_fd(ch);
    if (fd < 0) {
        return fd == -1 ? Py_NewRef(Py_None) : NULL;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, RT_READ_SIZE);
    if (data == NULL) {
        return NULL;
    }
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(RT_MAX_FDS * sizeof(int))];
    } control;
    struct iovec iov = {PyBytes_AS_STRING(data), RT_READ_SIZE};
    struct msghdr msg;
    ssize_t n;
    int err;
    for (;;) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        Py_BEGIN_ALLOW_THREADS
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0 || err != EINTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            Py_DECREF(data);
            return NULL;
        }
    }
    if (n < 0) {
        /* Nothing was read: recv's Python path reads again and reports what
         * it meets (a reset there is an end of stream, as here). */
        Py_DECREF(data);
        Py_RETURN_NONE;
    }
    if (rt_set(ch, RT_READ_SINCE_WRITE, Py_True) < 0) {
        Py_DECREF(data);
        return NULL;
    }
    int control_data = msg.msg_controllen > 0 || (msg.msg_flags & MSG_CTRUNC);
    PyObject *tried = Py_False;  /* _read_done need not try lone_message again */
    if (lone && !control_data && n > FRAME_HEADER) {
        PyObject *message = rt_lone_message(core, PyBytes_AS_STRING(data), n, cls);
        if (message != Py_None) {
            Py_DECREF(data);
            return message;  /* (or NULL) */
        }
        Py_DECREF(message);
        tried = Py_True;
    }
    if (_PyBytes_Resize(&data, n) < 0) {
        return NULL;
    }
    PyObject *result;
    if (!control_data) {
        PyObject *fds = PyList_New(0);
        result = fds ? PyObject_CallMethodObjArgs(ch, rt_name[RT_READ_DONE], data, fds, tried, NULL) : NULL;
        Py_XDECREF(fds);
    }
    else {
        PyObject *ancdata = rt_ancillary(&msg);
        PyObject *flags = ancdata ? PyLong_FromLong(msg.msg_flags) : NULL;
        result = flags ? PyObject_CallMethodObjArgs(ch, rt_name[RT_READ_DONE_ANCILLARY], data, ancdata, flags, NULL)
                       : NULL;
        Py_XDECREF(ancdata);
        Py_XDECREF(flags);
    }
    Py_DECREF(data);
    return result;
}

/* recv()'s round-trip path, with no batch being delivered: a Message,
 * Py_None (the Python method runs) or NULL. */
PyObject *
ipcbus_rt_recv(PyObject *ch, PyObject *core, PyTypeObject *cls)
{
    int ready = rt_fd(ch);  /* (a channel that has none: the cheapest way out) */
    if (ready < 0) {
        return ready == -1 ? Py_NewRef(Py_None) : NULL;
    }
    ready = rt_empty(core, RT_EVENTS);  /* parsed messages: Python's path */
    if (ready > 0) {
        ready = rt_is(core, RT_STATE, rt_name[RT_OPEN]);
    }
    if (ready > 0) {
        ready = rt_is(ch, RT_CLOSED, Py_False);
    }
    if (ready > 0) {
        ready = rt_try_lock(ch, RT_RLOCK_ACQUIRE);
    }
    if (ready <= 0) {
        return ready < 0 ? NULL : Py_NewRef(Py_None);
    }
    return rt_unlock(ch, RT_RLOCK_RELEASE, rt_read(ch, core, cls));
}

#endif /* HAVE_ROUND_TRIP */
