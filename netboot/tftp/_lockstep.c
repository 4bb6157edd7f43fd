/* The worker's lock-step block loop, in C.
 *
 * A lock-step transfer (windowsize 1, octet) spends nearly all its life answering the ACK of the block just
 * sent with the next block. In Python that costs about 9 us of interpreter time per block beside the two
 * system calls, and with 50 clients on two cores that alone made netboot's TFTP a third slower than
 * tftpd-hpa's; no library offers such a loop, so this one is hand-written. It does exactly what
 * Session.next_block does, for the transfers the worker registers here, and hands everything else back:
 *
 *   add(sock_fd, file_fd, blksize, size, acked, sent)   register a transfer in lock-step state
 *   take(sock_fd) -> (acked, sent, progress) | None      unregister it, with what this loop did meanwhile
 *   pump(epoll_fd, until, may_spin) -> [(fd, datagram | None), ...]
 *
 * pump() waits on the worker's epoll set (which Python owns) until `until` (time.monotonic(); negative: no
 * limit) or until something needs Python: a descriptor that is not registered here (datagram None), or a
 * datagram from a registered transfer that is not the expected ACK, is the final ACK, or whose next block
 * could not be read (the datagram, which Python feeds to the Session). Python takes the transfer back before
 * handling it, and registers it again when it is back in lock-step.
 *
 * With `may_spin` (the worker has a single transfer), after a block it polls the socket for a short window
 * instead of sleeping in epoll, as worker._Loop._poll does in Python.
 *
 * Arguments from Python are checked before use (an open descriptor, a size an off_t holds, block numbers
 * within the file), so that sizes and offsets are computed in unsigned 64-bit or size_t arithmetic that cannot
 * wrap; anything else raises ValueError (OSError for a descriptor that is not open).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define OP_DATA 3
#define OP_ACK 4
#define MAX_BLKSIZE 65464
#define RECV_SIZE 2048 /* a peer sends ACKs and ERRORs here; longer datagrams are truncated, as in Python */
#define MAX_EVENTS 256
#define POLL_WINDOW 50e-6 /* worker._POLL_WINDOW */
#define POLL_STREAK 256   /* worker._POLL_STREAK */
#define POLL_MISSES 8     /* worker._POLL_MISSES */

typedef struct {
    int active;
    int file_fd;
    uint32_t blksize;
    uint64_t size; /* at most MAX_SIZE */
    int64_t last; /* the number of the final block: size / blksize + 1, at most 2^60 */
    int64_t acked; /* -1: the OACK awaits ACK 0; at most `last` */
    int64_t sent; /* acked + 1 */
    double progress;
    unsigned misses;
} slot_t;

typedef struct {
    int fd;
    ssize_t length; /* -1: no datagram, the descriptor is Python's */
    unsigned char data[RECV_SIZE];
} event_t;

/* The largest file size: what off_t holds, so that every offset below it is a valid pread offset. */
#define MAX_SIZE ((uint64_t)INT64_MAX)

/* One loop per process (the worker's), so the table is the module's. Indexed by socket descriptor, which
 * lockstep_add checks is open: the table is never larger than the process's descriptor table. */
static slot_t *slots;
static size_t slot_count;
static size_t active;
static event_t events_out[MAX_EVENTS + 1];
static int events_out_count;
static unsigned char packet[4 + MAX_BLKSIZE];

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic() on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static slot_t *slot_of(int fd)
{
    return fd >= 0 && (size_t)fd < slot_count && slots[fd].active ? &slots[fd] : NULL;
}

static void hand_back(int fd, const unsigned char *data, ssize_t length)
{
    event_t *e = &events_out[events_out_count++];
    e->fd = fd;
    e->length = length;
    if (length > 0)
        memcpy(e->data, data, (size_t)length);
}

enum { NOTHING, SENT, HANDED_BACK };

/* One datagram from a registered transfer's socket: the next block for the expected ACK, else hand back. */
static int readable(int fd, slot_t *s, double now)
{
    ssize_t n = recv(fd, packet, RECV_SIZE, MSG_DONTWAIT);
    if (n < 0)
        return NOTHING; /* EAGAIN, or a queued ICMP error: the retransmission timer copes, as in Python */
    if (n == 4 && packet[0] == 0 && packet[1] == OP_ACK) {
        int64_t sent = s->sent;
        unsigned block = ((unsigned)packet[2] << 8) | packet[3];
        if (sent == s->acked + 1 && block == (uint64_t)sent % 65536 && sent < s->last) {
            /* 0 <= sent < last = size / blksize + 1: offset <= size <= MAX_SIZE, and want <= blksize. */
            uint64_t offset = (uint64_t)sent * s->blksize;
            size_t want = sent + 1 < s->last ? s->blksize : (size_t)(s->size - offset);
            /* The ACK's four bytes stay in place: on a failed read they go back to Python unchanged. */
            if (pread(s->file_fd, packet + 4, want, (off_t)offset) == (ssize_t)want) {
                s->acked = sent;
                s->sent = sent + 1;
                s->progress = now;
                packet[1] = OP_DATA;
                packet[2] = (unsigned char)(((uint64_t)(sent + 1) >> 8) & 0xFF);
                packet[3] = (unsigned char)((uint64_t)(sent + 1) & 0xFF);
                /* A full buffer or an unreachable peer: lost like any UDP loss; the timer resends. */
                (void)send(fd, packet, 4 + want, MSG_DONTWAIT);
                return SENT;
            }
        }
    }
    hand_back(fd, packet, n);
    return HANDED_BACK;
}

/* The single transfer's next datagrams, as they come within the window after each block. */
static void spin(int fd, slot_t *s)
{
    for (int i = 0; i < POLL_STREAK; i++) {
        double deadline = monotonic_now() + POLL_WINDOW;
        int r;
        while ((r = readable(fd, s, monotonic_now())) == NOTHING) {
            if (monotonic_now() >= deadline) {
                s->misses++;
                return;
            }
        }
        s->misses = 0;
        if (r == HANDED_BACK)
            return;
    }
}

/* An integer argument within [min, max], else ValueError naming it ("<context>: <what> <value> is not ...").
 * Any Python int is read, however large, so that no value wraps on its way into C (as the "I" and "K" formats
 * do) and none is refused with a bare OverflowError (as "i" and "L" do). */
static int integer_arg(PyObject *obj, const char *context, const char *what, long long min, long long max,
                       long long *out)
{
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred())
        return 0;
    if (overflow || value < min || value > max) {
        PyErr_Format(PyExc_ValueError, "%s: %s %R is not between %lld and %lld", context, what, obj, min, max);
        return 0;
    }
    *out = value;
    return 1;
}

#define NOT_LOCKSTEP "not a lock-step transfer"

/* An open descriptor, else OSError with its errno (EBADF), as os.fstat would raise, naming the argument. */
static int open_descriptor(int fd, const char *what)
{
    if (fcntl(fd, F_GETFD) >= 0)
        return 1;
    int error = errno;
    char why[160];
    snprintf(why, sizeof why, NOT_LOCKSTEP ": %s %d is not an open descriptor (%s)", what, fd, strerror(error));
    PyObject *exception = PyObject_CallFunction(PyExc_OSError, "is", error, why);
    if (exception != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exception), exception);
        Py_DECREF(exception);
    }
    return 0;
}

static PyObject *lockstep_add(PyObject *self, PyObject *args)
{
    PyObject *fd_arg, *file_fd_arg, *blksize_arg, *size_arg, *acked_arg, *sent_arg;
    long long fd, file_fd, blksize, size, acked, sent;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOO", &fd_arg, &file_fd_arg, &blksize_arg, &size_arg, &acked_arg, &sent_arg))
        return NULL;
    if (!integer_arg(fd_arg, NOT_LOCKSTEP, "sock_fd", 0, INT_MAX, &fd)
        || !integer_arg(file_fd_arg, NOT_LOCKSTEP, "file_fd", 0, INT_MAX, &file_fd)
        || !integer_arg(blksize_arg, NOT_LOCKSTEP, "blksize", 8, MAX_BLKSIZE, &blksize)
        || !integer_arg(size_arg, NOT_LOCKSTEP, "size", 0, (long long)MAX_SIZE, &size))
        return NULL;
    int64_t last = (int64_t)((uint64_t)size / (uint64_t)blksize) + 1; /* at most 2^63 / 8 + 1: no overflow */
    if (!integer_arg(acked_arg, NOT_LOCKSTEP, "acked", -1, last, &acked)
        || !integer_arg(sent_arg, NOT_LOCKSTEP, "sent", 0, last + 1, &sent))
        return NULL;
    if (sent != acked + 1) { /* both bounded above: no overflow */
        PyErr_Format(PyExc_ValueError, NOT_LOCKSTEP ": sent %lld is not acked %lld + 1", sent, acked);
        return NULL;
    }
    if (!open_descriptor((int)fd, "sock_fd") || !open_descriptor((int)file_fd, "file_fd"))
        return NULL;
    if ((size_t)fd >= slot_count) {
        /* In size_t: fd + 1 <= INT_MAX + 1, and 2 * slot_count cannot wrap while slot_count * sizeof(slot_t)
         * fits (checked below for the new count). */
        size_t count = (size_t)fd + 1 > 2 * slot_count ? (size_t)fd + 1 : 2 * slot_count;
        if (count > SIZE_MAX / sizeof(slot_t))
            return PyErr_NoMemory();
        slot_t *grown = realloc(slots, count * sizeof(slot_t));
        if (grown == NULL)
            return PyErr_NoMemory();
        memset(grown + slot_count, 0, (count - slot_count) * sizeof(slot_t));
        slots = grown;
        slot_count = count;
    }
    slot_t *s = &slots[fd];
    if (!s->active)
        active++;
    s->active = 1;
    s->file_fd = (int)file_fd;
    s->blksize = (uint32_t)blksize;
    s->size = (uint64_t)size;
    s->last = last;
    s->acked = acked;
    s->sent = sent;
    s->progress = 0;
    Py_RETURN_NONE;
}

static PyObject *lockstep_take(PyObject *self, PyObject *args)
{
    PyObject *fd_arg;
    int overflow;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &fd_arg))
        return NULL;
    long long fd = PyLong_AsLongLongAndOverflow(fd_arg, &overflow);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    /* Any other int is a descriptor never registered (a closed socket's fileno() is -1): nothing to take. */
    slot_t *s = !overflow && fd >= 0 && fd <= INT_MAX ? slot_of((int)fd) : NULL;
    if (s == NULL)
        Py_RETURN_NONE;
    s->active = 0;
    active--;
    return Py_BuildValue("LLd", (long long)s->acked, (long long)s->sent, s->progress);
}

static PyObject *lockstep_pump(PyObject *self, PyObject *args)
{
    PyObject *epfd_arg;
    long long epfd;
    int may_spin, failed = 0;
    double until;
    struct epoll_event ready[MAX_EVENTS];
    (void)self;
    if (!PyArg_ParseTuple(args, "Odp", &epfd_arg, &until, &may_spin))
        return NULL;
    if (!integer_arg(epfd_arg, "pump", "epoll_fd", 0, INT_MAX, &epfd))
        return NULL;
    if (isnan(until)) {
        PyErr_SetString(PyExc_ValueError, "pump: until is NaN (a time.monotonic() value, or negative: no limit)");
        return NULL;
    }
    events_out_count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        double now = monotonic_now();
        int timeout = -1;
        if (until >= 0) {
            double ms = ceil((until - now) * 1000);
            timeout = ms <= 0 ? 0 : ms >= INT_MAX ? INT_MAX : (int)ms;
        }
        int n = epoll_wait((int)epfd, ready, MAX_EVENTS, timeout);
        if (n < 0) {
            failed = errno == EINTR ? 0 : errno; /* a signal: back to Python, which handles it */
            break;
        }
        now = monotonic_now();
        int last_sent = -1;
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            slot_t *s = slot_of(fd);
            if (s == NULL)
                hand_back(fd, NULL, -1);
            else if (readable(fd, s, now) == SENT)
                last_sent = fd;
        }
        if (events_out_count)
            break;
        if (may_spin && active == 1 && n == 1 && last_sent >= 0 && slots[last_sent].misses < POLL_MISSES) {
            spin(last_sent, &slots[last_sent]);
            if (events_out_count)
                break;
        }
        if (until >= 0 && monotonic_now() >= until)
            break;
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *list = PyList_New(events_out_count);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < events_out_count; i++) {
        event_t *e = &events_out[i];
        PyObject *item;
        if (e->length < 0)
            item = Py_BuildValue("(iO)", e->fd, Py_None);
        else
            item = Py_BuildValue("(iy#)", e->fd, (const char *)e->data, (Py_ssize_t)e->length);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"add", lockstep_add, METH_VARARGS, "add(sock_fd, file_fd, blksize, size, acked, sent): register a transfer"},
    {"take", lockstep_take, METH_VARARGS, "take(sock_fd) -> (acked, sent, progress) | None: unregister it"},
    {"pump", lockstep_pump, METH_VARARGS,
     "pump(epoll_fd, until, may_spin) -> [(fd, datagram | None)]: run until Python has something to do"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lockstep", "The TFTP worker's lock-step block loop.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lockstep(void)
{
    return PyModule_Create(&module);
}
