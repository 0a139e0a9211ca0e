/* An LD_PRELOAD shim for tests/test_durability.py: it journals, in the order they
 * happen, what reaches the kernel for the audit log's files and for the clients.
 *
 *   W  a write to a tracked file: its path, offset and bytes (write, pwrite, pwrite64)
 *   S  an fsync or fdatasync of a tracked file that returned 0, journaled only after
 *      it returned: a write journaled before an S of its file was on stable storage
 *   T  an ftruncate of a tracked file (its new length)
 *   U  an unlink of a tracked file
 *   N  bytes handed to a TCP socket (send, sendto, sendmsg, write, writev), journaled
 *      before they go: the client's local port and the bytes' first 1 KiB
 *
 * A tracked file is $DURABILITY_TRACK (a directory: an S of it makes its entries, an
 * unlink among them, durable) or a file in it. The journal, $DURABILITY_JOURNAL, is
 * appended one record per write(2) under a lock, so its order is the order of the
 * events, and a kill -9 loses nothing journaled before it. Without both variables the
 * shim only passes calls on.
 *
 * Record: "DJ01", type (1 byte), tid (u32), CLOCK_MONOTONIC ns (u64), offset (i64),
 * path length (u32), data length (u32), then the path and the data (little-endian).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define NET_BYTES 1024

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_send)(int, const void *, size_t, int);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);

#define READY()                                                                        \
    do {                                                                               \
        if (real_unlinkat == NULL)                                                     \
            resolve();                                                                 \
    } while (0)

static int journal = -1;
static char track[PATH_MAX];
static size_t track_len;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Looked up on first use too: another library's constructor may write before ours. */
static void resolve(void) {
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_send = dlsym(RTLD_NEXT, "send");
    real_sendto = dlsym(RTLD_NEXT, "sendto");
    real_sendmsg = dlsym(RTLD_NEXT, "sendmsg");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_unlinkat = dlsym(RTLD_NEXT, "unlinkat");
}

__attribute__((constructor)) static void shim_init(void) {
    if (real_unlinkat == NULL)
        resolve();
    const char *path = getenv("DURABILITY_JOURNAL");
    const char *dir = getenv("DURABILITY_TRACK");
    if (path == NULL || dir == NULL || strlen(dir) >= sizeof(track))
        return;
    strcpy(track, dir);
    track_len = strlen(track);
    journal = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One record, one write(2); the caller holds `lock`. */
static void emit(char type, int64_t offset, const char *path, const void *data, size_t len) {
    uint32_t path_len = path ? (uint32_t)strlen(path) : 0;
    size_t total = 4 + 1 + 4 + 8 + 8 + 4 + 4 + path_len + len;
    char stack[8192];
    char *buf = total <= sizeof(stack) ? stack : malloc(total);
    if (buf == NULL)
        abort(); /* a journal with a hole would prove nothing */
    uint32_t tid = (uint32_t)syscall(SYS_gettid), data_len = (uint32_t)len;
    uint64_t ts = now_ns();
    char *p = buf;
    memcpy(p, "DJ01", 4), p += 4;
    *p++ = type;
    memcpy(p, &tid, 4), p += 4;
    memcpy(p, &ts, 8), p += 8;
    memcpy(p, &offset, 8), p += 8;
    memcpy(p, &path_len, 4), p += 4;
    memcpy(p, &data_len, 4), p += 4;
    if (path_len)
        memcpy(p, path, path_len), p += path_len;
    if (len)
        memcpy(p, data, len);
    size_t done = 0;
    while (done < total) {
        ssize_t n = real_write(journal, buf + done, total - done);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            abort();
        }
        done += (size_t)n;
    }
    if (buf != stack)
        free(buf);
}

/* The tracked directory itself, or a path in it. */
static int under_track(const char *path) {
    return strncmp(path, track, track_len) == 0 && (path[track_len] == '\0' || path[track_len] == '/');
}

/* The tracked path behind fd, in `out`, or 0. */
static int tracked_fd(int fd, char *out) {
    if (journal < 0 || fd < 0)
        return 0;
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n <= 0)
        return 0;
    out[n] = '\0';
    return under_track(out);
}

static int tracked_path(const char *path) { return journal >= 0 && under_track(path); }

/* The client's port when fd is a connected TCP socket, else -1. */
static int tcp_peer(int fd) {
    if (journal < 0 || fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode))
        return -1;
    struct sockaddr_storage peer;
    socklen_t len = sizeof(peer);
    if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0)
        return -1;
    if (peer.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&peer)->sin_port);
    if (peer.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&peer)->sin6_port);
    return -1;
}

static void net(int port, const void *data, size_t len) {
    pthread_mutex_lock(&lock);
    emit('N', port, NULL, data, len < NET_BYTES ? len : NET_BYTES);
    pthread_mutex_unlock(&lock);
}

static void net_iov(int port, const struct iovec *iov, int count) {
    char head[NET_BYTES];
    size_t len = 0;
    for (int i = 0; i < count && len < NET_BYTES; i++) {
        size_t take = iov[i].iov_len < NET_BYTES - len ? iov[i].iov_len : NET_BYTES - len;
        memcpy(head + len, iov[i].iov_base, take);
        len += take;
    }
    net(port, head, len);
}

/* A write to a tracked file: done and journaled under the lock, so that no S of the
 * file can come between the two. */
static ssize_t file_write(int fd, const char *path, const void *buf, size_t count, off_t at,
                          int positioned) {
    pthread_mutex_lock(&lock);
    ssize_t n = positioned ? real_pwrite64(fd, buf, count, at) : real_write(fd, buf, count);
    int saved = errno;
    if (n > 0) {
        off_t offset = positioned ? at : lseek(fd, 0, SEEK_CUR) - n;
        emit('W', offset, path, buf, (size_t)n);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

ssize_t write(int fd, const void *buf, size_t count) {
    READY();
    char path[PATH_MAX];
    if (tracked_fd(fd, path))
        return file_write(fd, path, buf, count, 0, 0);
    int port = tcp_peer(fd);
    if (port >= 0)
        net(port, buf, count);
    return real_write(fd, buf, count);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    READY();
    char path[PATH_MAX];
    if (tracked_fd(fd, path))
        return file_write(fd, path, buf, count, offset, 1);
    return real_pwrite64(fd, buf, count, offset);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    READY();
    char path[PATH_MAX];
    if (tracked_fd(fd, path))
        return file_write(fd, path, buf, count, offset, 1);
    return real_pwrite(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int count) {
    READY();
    int port = tcp_peer(fd);
    if (port >= 0)
        net_iov(port, iov, count);
    return real_writev(fd, iov, count);
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
    READY();
    int port = tcp_peer(fd);
    if (port >= 0)
        net(port, buf, len);
    return real_send(fd, buf, len, flags);
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
               socklen_t addrlen) {
    READY();
    int port = tcp_peer(fd);
    if (port >= 0)
        net(port, buf, len);
    return real_sendto(fd, buf, len, flags, addr, addrlen);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    READY();
    int port = tcp_peer(fd);
    if (port >= 0)
        net_iov(port, msg->msg_iov, (int)msg->msg_iovlen);
    return real_sendmsg(fd, msg, flags);
}

static int synced(int fd, int result) {
    char path[PATH_MAX];
    if (result == 0 && tracked_fd(fd, path)) {
        int saved = errno;
        pthread_mutex_lock(&lock);
        emit('S', 0, path, NULL, 0);
        pthread_mutex_unlock(&lock);
        errno = saved;
    }
    return result;
}

int fsync(int fd) {
    READY();
    return synced(fd, real_fsync(fd));
}

int fdatasync(int fd) {
    READY();
    return synced(fd, real_fdatasync(fd));
}

static int truncated(int fd, off_t length, int result) {
    char path[PATH_MAX];
    if (result == 0 && tracked_fd(fd, path)) {
        pthread_mutex_lock(&lock);
        emit('T', length, path, NULL, 0);
        pthread_mutex_unlock(&lock);
    }
    return result;
}

int ftruncate(int fd, off_t length) {
    READY();
    return truncated(fd, length, real_ftruncate(fd, length));
}

int ftruncate64(int fd, off_t length) {
    READY();
    return truncated(fd, length, real_ftruncate64(fd, length));
}

int unlink(const char *path) {
    READY();
    int result = real_unlink(path);
    if (result == 0 && tracked_path(path)) {
        pthread_mutex_lock(&lock);
        emit('U', 0, path, NULL, 0);
        pthread_mutex_unlock(&lock);
    }
    return result;
}

int unlinkat(int dirfd, const char *path, int flags) {
    READY();
    int result = real_unlinkat(dirfd, path, flags);
    if (result == 0 && path[0] == '/' && tracked_path(path)) {
        pthread_mutex_lock(&lock);
        emit('U', 0, path, NULL, 0);
        pthread_mutex_unlock(&lock);
    }
    return result;
}
