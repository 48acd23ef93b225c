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
 *               itself (Channel._write_lone) and LazyRecv does recv's
 *               round-trip read, parsing one plain frame as
 *               Connection.lone_message does (other reads: _read_done).
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

#ifdef __linux__
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#define HAVE_ROUND_TRIP 1
#else
#define HAVE_ROUND_TRIP 0
#endif

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

/* --------------------------------------------------------------- round trip */

/* The attributes the round trip reads and writes, by name: a Channel's
 * (ipcbus/_channel.py) and its Connection's (ipcbus/_protocol.py). Exported
 * as ROUND_TRIP_NAMES, which tests/test_speedups.py checks against a live
 * channel; a rename that misses this list fails there and in every round
 * trip (an AttributeError, never a silent difference). */
enum {
    /* Channel */
    RT_FD, RT_CORE, RT_CLOSED, RT_PARTIAL, RT_QUICK, RT_READ_SINCE_WRITE, RT_LAST_WRITE,
    RT_RLOCK_ACQUIRE, RT_RLOCK_RELEASE, RT_WLOCK_ACQUIRE, RT_WLOCK_RELEASE,
    RT_READ_DONE, RT_READ_DONE_ANCILLARY, RT_WROTE_LONE,
    /* Connection */
    RT_EVENTS, RT_STATE, RT_OUT, RT_PENDING, RT_BIG, RT_BUF, RT_FDS, RT_MAX_MESSAGE_SIZE, RT_ONE,
    RT_ONE_TOLD, RT_NEW_ONE, RT_DECODE, RT_PREFIXES, RT_CONSUMED, RT_ERROR, RT_CLOSED_FOR_SENDING,
    RT_HELD, RT_SEND_LIMIT, RT_HRUN,
    /* msgpack.Unpacker's methods, a message's key, the core's open state */
    RT_FEED, RT_UNPACK, RT_TELL, RT_CMD, RT_OPEN,
    RT_NAMES
};
#define RT_FIRST_CORE_NAME RT_EVENTS
#define RT_FIRST_OTHER_NAME RT_FEED

static const char *const rt_text[RT_NAMES] = {
    "_rt_fd", "_core", "_closed", "_partial", "_quick", "_read_since_write", "_last_write",
    "_rlock_acquire", "_rlock_release", "_wlock_acquire", "_wlock_release",
    "_read_done", "_read_done_ancillary", "_wrote_lone",
    "_events", "_state", "_out", "_pending", "_big", "_buf", "_fds", "max_message_size", "_one",
    "_one_told", "_new_one", "_decode", "_prefixes", "_consumed", "_error", "_closed_for_sending",
    "_held", "_send_limit", "_hrun",
    "feed", "unpack", "tell", "cmd", "OPEN",
};
static PyObject *rt_name[RT_NAMES];

#if HAVE_ROUND_TRIP

/* What one read asks for (SocketStream.receive's SMALL_READ), and the
 * largest reply written here (larger ones take the Python path). A read is
 * never larger than Connection's ONE_UNPACKER_MAX, so lone_message's
 * kept-Unpacker branch is the one to mirror. */
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

static int
rt_send(PyObject *ch, PyObject *payload)
{
    Py_ssize_t size = PyBytes_GET_SIZE(payload);
    if (size > RT_WRITE_MAX) {
        return 0;
    }
    int fd = rt_fd(ch);  /* (a channel that has none: the cheapest way out) */
    if (fd < 0) {
        return fd == -1 ? 0 : -1;
    }
    PyObject *core = PyObject_GetAttr(ch, rt_name[RT_CORE]);
    if (core == NULL) {
        return -1;
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
    Py_DECREF(core);
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
    PyObject *value = NULL;
    PyObject *one = PyObject_GetAttr(core, rt_name[RT_ONE]);
    if (one == NULL) {
        goto error;
    }
    if (one != Py_None) {
        /* msgpack: the kept Unpacker, and its position must move by exactly
         * the payload (a bad value, or one followed by more, does not). */
        Py_ssize_t told = rt_ssize(core, RT_ONE_TOLD);
        if (told == -1 && PyErr_Occurred()) {
            goto error;
        }
        told += length;
        PyObject *fed = PyObject_CallMethodOneArg(one, rt_name[RT_FEED], payload);
        if (fed != NULL) {
            Py_DECREF(fed);
            value = PyObject_CallMethodNoArgs(one, rt_name[RT_UNPACK]);
        }
        if (value == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                goto error;
            }
            PyErr_Clear();
            told = -1;
        }
        PyObject *pos = PyObject_CallMethodNoArgs(one, rt_name[RT_TELL]);
        if (pos == NULL) {
            goto error;
        }
        Py_ssize_t at = PyLong_AsSsize_t(pos);
        Py_DECREF(pos);
        if (at == -1 && PyErr_Occurred()) {
            goto error;
        }
        if (at != told) {
            Py_CLEAR(value);
            if (rt_set_new(core, RT_ONE, PyObject_CallMethodNoArgs(core, rt_name[RT_NEW_ONE])) < 0) {
                goto error;
            }
            Py_DECREF(one);
            Py_DECREF(payload);
            Py_RETURN_NONE;
        }
        if (rt_set_new(core, RT_ONE_TOLD, PyLong_FromSsize_t(told)) < 0) {
            goto error;
        }
    }
    else {
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
            Py_DECREF(one);
            Py_DECREF(payload);
            Py_RETURN_NONE;
        }
    }
    Py_CLEAR(one);
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
    PyObject *message = cls->tp_alloc(cls, 2);
    if (message == NULL) {
        goto error;
    }
    PyTuple_SET_ITEM(message, 0, value);
    PyTuple_SET_ITEM(message, 1, Py_NewRef(Py_None));
    return message;

error:
    Py_XDECREF(value);
    Py_XDECREF(one);
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
    if (lone && !control_data && n > FRAME_HEADER) {
        PyObject *message = rt_lone_message(core, PyBytes_AS_STRING(data), n, cls);
        if (message != Py_None) {
            Py_DECREF(data);
            return message;  /* (or NULL) */
        }
        Py_DECREF(message);
    }
    if (_PyBytes_Resize(&data, n) < 0) {
        return NULL;
    }
    PyObject *result;
    if (!control_data) {
        PyObject *fds = PyList_New(0);
        result = fds ? PyObject_CallMethodObjArgs(ch, rt_name[RT_READ_DONE], data, fds, NULL) : NULL;
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
static PyObject *
rt_recv(PyObject *ch, PyObject *core, PyTypeObject *cls)
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
            int sent = rt_send(obj, payload);
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
        PyObject *message = rt_recv(obj, core, (PyTypeObject *)self->extra);
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
    for (int i = 0; i < RT_NAMES; i++) {
        if (rt_name[i] == NULL && (rt_name[i] = PyUnicode_InternFromString(rt_text[i])) == NULL) {
            return NULL;
        }
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    /* ROUND_TRIP_NAMES: ((owner, name), ...) of the attributes read by name. */
    PyObject *names = PyTuple_New(RT_FIRST_OTHER_NAME);
    if (names == NULL || PyModule_AddObject(module, "ROUND_TRIP_NAMES", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(module);
        return NULL;
    }
    for (int i = 0; i < RT_FIRST_OTHER_NAME; i++) {
        PyObject *item = Py_BuildValue("(sO)", i < RT_FIRST_CORE_NAME ? "channel" : "core", rt_name[i]);
        if (item == NULL) {
            Py_DECREF(module);
            return NULL;
        }
        PyTuple_SET_ITEM(names, i, item);
    }
    if (PyModule_AddIntConstant(module, "HAVE_ROUND_TRIP", HAVE_ROUND_TRIP) < 0) {
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
