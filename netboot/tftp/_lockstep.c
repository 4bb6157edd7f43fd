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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
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
    uint64_t size;
    int64_t last; /* the number of the final block */
    int64_t acked; /* -1: the OACK awaits ACK 0 */
    int64_t sent;
    double progress;
    unsigned misses;
} slot_t;

typedef struct {
    int fd;
    int length; /* -1: no datagram, the descriptor is Python's */
    unsigned char data[RECV_SIZE];
} event_t;

/* One loop per process (the worker's), so the table is the module's. Indexed by socket descriptor. */
static slot_t *slots;
static int slot_count;
static int active;
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
    return fd >= 0 && fd < slot_count && slots[fd].active ? &slots[fd] : NULL;
}

static void hand_back(int fd, const unsigned char *data, int length)
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
    hand_back(fd, packet, (int)n);
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

static PyObject *lockstep_add(PyObject *self, PyObject *args)
{
    int fd, file_fd;
    unsigned int blksize;
    unsigned long long size;
    long long acked, sent;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiIKLL", &fd, &file_fd, &blksize, &size, &acked, &sent))
        return NULL;
    if (fd < 0 || blksize < 8 || blksize > MAX_BLKSIZE || sent != acked + 1 || acked < -1) {
        PyErr_SetString(PyExc_ValueError, "not a lock-step transfer");
        return NULL;
    }
    if (fd >= slot_count) {
        int count = fd + 1 > 2 * slot_count ? fd + 1 : 2 * slot_count;
        slot_t *grown = realloc(slots, (size_t)count * sizeof(slot_t));
        if (grown == NULL)
            return PyErr_NoMemory();
        memset(grown + slot_count, 0, (size_t)(count - slot_count) * sizeof(slot_t));
        slots = grown;
        slot_count = count;
    }
    slot_t *s = &slots[fd];
    if (!s->active)
        active++;
    s->active = 1;
    s->file_fd = file_fd;
    s->blksize = blksize;
    s->size = size;
    s->last = (int64_t)(size / blksize) + 1;
    s->acked = acked;
    s->sent = sent;
    s->progress = 0;
    Py_RETURN_NONE;
}

static PyObject *lockstep_take(PyObject *self, PyObject *args)
{
    int fd;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    slot_t *s = slot_of(fd);
    if (s == NULL)
        Py_RETURN_NONE;
    s->active = 0;
    active--;
    return Py_BuildValue("LLd", (long long)s->acked, (long long)s->sent, s->progress);
}

static PyObject *lockstep_pump(PyObject *self, PyObject *args)
{
    int epfd, may_spin, failed = 0;
    double until;
    struct epoll_event ready[MAX_EVENTS];
    (void)self;
    if (!PyArg_ParseTuple(args, "idp", &epfd, &until, &may_spin))
        return NULL;
    events_out_count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        double now = monotonic_now();
        int timeout = -1;
        if (until >= 0) {
            double ms = ceil((until - now) * 1000);
            timeout = ms <= 0 ? 0 : ms >= INT_MAX ? INT_MAX : (int)ms;
        }
        int n = epoll_wait(epfd, ready, MAX_EVENTS, timeout);
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
