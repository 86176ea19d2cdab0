/* LD_PRELOAD shim for tests/integration/power.rs: a journal of everything the server
 * does to the files of its data dir, so the test can build the disk a power cut would
 * leave (tests/integration/power/image.rs replays it).
 *
 * With PRENOTA_POWER_ROOT=DIR (absolute) and PRENOTA_POWER_LOG=FILE in the environment,
 * every change under DIR is appended to FILE, in the order it happened, while it
 * happens (one lock around the real call and its record):
 *   create (a new file and its inode), mkdir, write (inode, offset, bytes), truncate,
 *   sync (fsync/fdatasync of a file: its data is durable), dirsync (fsync of a
 *   directory: its entries are durable), rename, unlink.
 * sync_file_range is not a barrier and is not recorded. The journal survives the
 * kill -9 that stands for the power cut (it is in the page cache, which a kill keeps).
 * Without the variables every call is the real one. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { OP_CREATE = 1, OP_MKDIR, OP_WRITE, OP_TRUNC, OP_SYNC, OP_DIRSYNC, OP_RENAME, OP_UNLINK };

/* Per fd: 0 not known yet, 1 under the root, 2 elsewhere. */
#define FDS_MAX 65536
static volatile unsigned char fd_state[FDS_MAX];

static pthread_mutex_t journal_lock = PTHREAD_MUTEX_INITIALIZER;
static int journal_fd = -1;
static char root[PATH_MAX];
static size_t root_len;

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_mkdir)(const char *, mode_t);

#define RESOLVE(name) real_##name = dlsym(RTLD_NEXT, #name)

static void resolve(void) {
    RESOLVE(open);
    RESOLVE(openat);
    RESOLVE(close);
    RESOLVE(write);
    RESOLVE(pwrite);
    RESOLVE(writev);
    RESOLVE(pwritev);
    RESOLVE(fsync);
    RESOLVE(fdatasync);
    RESOLVE(ftruncate);
    RESOLVE(rename);
    RESOLVE(renameat);
    RESOLVE(renameat2);
    RESOLVE(unlink);
    RESOLVE(unlinkat);
    RESOLVE(mkdir);
    const char *dir = getenv("PRENOTA_POWER_ROOT");
    const char *log = getenv("PRENOTA_POWER_LOG");
    if (dir == NULL || log == NULL || dir[0] != '/' || strlen(dir) >= sizeof root) return;
    /* Paths are compared resolved (/proc/self/fd links are): resolve the root too. */
    if (realpath(dir, root) == NULL) strcpy(root, dir);
    root_len = strlen(root);
    while (root_len > 1 && root[root_len - 1] == '/') root[--root_len] = '\0';
    journal_fd = real_open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
}

static pthread_once_t resolved = PTHREAD_ONCE_INIT;

/* Every wrapper starts here: a call before the constructor (from another library's
 * constructor) resolves the real functions first. */
#define READY() pthread_once(&resolved, resolve)

__attribute__((constructor)) static void power_cut_init(void) { READY(); }

static void put(const void *bytes, size_t len) {
    const char *at = bytes;
    while (len > 0) {
        ssize_t n = real_write(journal_fd, at, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) abort(); /* a journal with a hole would test nothing */
        at += n;
        len -= (size_t)n;
    }
}

static void put_u8(uint8_t v) { put(&v, 1); }
static void put_u32(uint32_t v) { put(&v, 4); }
static void put_u64(uint64_t v) { put(&v, 8); }
static void put_path(const char *path) {
    put_u32((uint32_t)strlen(path));
    put(path, strlen(path));
}

/* `path` made absolute (relative to `dirfd` or the working directory) into `out`. */
static int absolute(int dirfd, const char *path, char *out) {
    if (path[0] == '/') {
        snprintf(out, PATH_MAX, "%s", path);
        return 0;
    }
    char base[PATH_MAX];
    if (dirfd == AT_FDCWD) {
        if (getcwd(base, sizeof base) == NULL) return -1;
    } else {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, base, sizeof base - 1);
        if (n < 0) return -1;
        base[n] = '\0';
    }
    snprintf(out, PATH_MAX, "%s/%s", base, path);
    return 0;
}

static int under_root(const char *absolute_path) {
    return journal_fd >= 0 && strncmp(absolute_path, root, root_len) == 0 &&
           (absolute_path[root_len] == '/' || absolute_path[root_len] == '\0');
}

/* Whether `fd` is a file or directory under the root (cached until it is closed). */
static int tracked(int fd) {
    if (journal_fd < 0 || fd < 0) return 0;
    if (fd < FDS_MAX && fd_state[fd] != 0) return fd_state[fd] == 1;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    int yes = 0;
    if (n > 0) {
        path[n] = '\0';
        yes = under_root(path);
    }
    if (fd < FDS_MAX) fd_state[fd] = yes ? 1 : 2;
    return yes;
}

static uint64_t inode_of(int fd, int *is_dir) {
    struct stat st;
    if (fstat(fd, &st) != 0) return 0;
    *is_dir = S_ISDIR(st.st_mode);
    return (uint64_t)st.st_ino;
}

static int opened(int dirfd, const char *path, int flags, mode_t mode, int at) {
    char full[PATH_MAX];
    int watched = journal_fd >= 0 && absolute(dirfd, path, full) == 0 && under_root(full);
    if (!watched) {
        int fd = at ? real_openat(dirfd, path, flags, mode) : real_open(path, flags, mode);
        if (fd >= 0 && fd < FDS_MAX) fd_state[fd] = 2;
        return fd;
    }
    pthread_mutex_lock(&journal_lock);
    struct stat before;
    int existed = stat(full, &before) == 0;
    int fd = at ? real_openat(dirfd, path, flags, mode) : real_open(path, flags, mode);
    if (fd >= 0) {
        if (fd < FDS_MAX) fd_state[fd] = 1;
        int is_dir = 0;
        uint64_t ino = inode_of(fd, &is_dir);
        if (!existed && (flags & O_CREAT)) {
            put_u8(OP_CREATE);
            put_u64(ino);
            put_path(full);
        } else if (existed && (flags & O_TRUNC) && !is_dir) {
            put_u8(OP_TRUNC);
            put_u64(ino);
            put_u64(0);
        }
    }
    pthread_mutex_unlock(&journal_lock);
    return fd;
}

static mode_t mode_arg(int flags, va_list args) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(args, int) : 0;
}

int open(const char *path, int flags, ...) {
    READY();
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_arg(flags, args);
    va_end(args);
    return opened(AT_FDCWD, path, flags, mode, 0);
}

int open64(const char *path, int flags, ...) {
    READY();
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_arg(flags, args);
    va_end(args);
    return opened(AT_FDCWD, path, flags, mode, 0);
}

int openat(int dirfd, const char *path, int flags, ...) {
    READY();
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_arg(flags, args);
    va_end(args);
    return opened(dirfd, path, flags, mode, 1);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    READY();
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_arg(flags, args);
    va_end(args);
    return opened(dirfd, path, flags, mode, 1);
}

int creat(const char *path, mode_t mode) {
    READY();
    return opened(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, 0);
}

int creat64(const char *path, mode_t mode) { return creat(path, mode); }

int close(int fd) {
    READY();
    if (fd >= 0 && fd < FDS_MAX) fd_state[fd] = 0;
    return real_close(fd);
}

/* One write of `total` bytes from `iov` at `offset` (-1: the fd's position). */
static ssize_t written(int fd, const struct iovec *iov, int count, off_t offset) {
    if (!tracked(fd)) {
        if (offset >= 0) return real_pwritev(fd, iov, count, offset);
        return real_writev(fd, iov, count);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        /* A stale cache entry (an fd closed behind close(), now something else). */
        if (fd < FDS_MAX) fd_state[fd] = 2;
        if (offset >= 0) return real_pwritev(fd, iov, count, offset);
        return real_writev(fd, iov, count);
    }
    pthread_mutex_lock(&journal_lock);
    off_t at = offset;
    if (at < 0) {
        at = (fcntl(fd, F_GETFL) & O_APPEND) ? lseek(fd, 0, SEEK_END) : lseek(fd, 0, SEEK_CUR);
    }
    ssize_t n = offset >= 0 ? real_pwritev(fd, iov, count, offset) : real_writev(fd, iov, count);
    if (n > 0) {
        int is_dir = 0;
        put_u8(OP_WRITE);
        put_u64(inode_of(fd, &is_dir));
        put_u64((uint64_t)at);
        put_u64((uint64_t)n);
        size_t left = (size_t)n;
        for (int i = 0; i < count && left > 0; i++) {
            size_t part = iov[i].iov_len < left ? iov[i].iov_len : left;
            put(iov[i].iov_base, part);
            left -= part;
        }
    }
    pthread_mutex_unlock(&journal_lock);
    return n;
}

ssize_t write(int fd, const void *buf, size_t len) {
    READY();
    if (!tracked(fd)) return real_write(fd, buf, len);
    struct iovec one = {(void *)buf, len};
    return written(fd, &one, 1, -1);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t offset) {
    READY();
    if (!tracked(fd)) return real_pwrite(fd, buf, len, offset);
    struct iovec one = {(void *)buf, len};
    return written(fd, &one, 1, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t offset) {
    return pwrite(fd, buf, len, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int count) {
    READY();
    if (!tracked(fd)) return real_writev(fd, iov, count);
    return written(fd, iov, count, -1);
}

ssize_t pwritev(int fd, const struct iovec *iov, int count, off_t offset) {
    READY();
    if (!tracked(fd)) return real_pwritev(fd, iov, count, offset);
    return written(fd, iov, count, offset);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int count, off_t offset) {
    return pwritev(fd, iov, count, offset);
}

static int synced(int fd, int data_only) {
    if (!tracked(fd)) return data_only ? real_fdatasync(fd) : real_fsync(fd);
    pthread_mutex_lock(&journal_lock);
    int result = data_only ? real_fdatasync(fd) : real_fsync(fd);
    if (result == 0) {
        int is_dir = 0;
        uint64_t ino = inode_of(fd, &is_dir);
        if (is_dir) {
            char link[64], path[PATH_MAX];
            snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
            ssize_t n = readlink(link, path, sizeof path - 1);
            if (n > 0) {
                path[n] = '\0';
                put_u8(OP_DIRSYNC);
                put_path(path);
            }
        } else {
            put_u8(OP_SYNC);
            put_u64(ino);
        }
    }
    pthread_mutex_unlock(&journal_lock);
    return result;
}

int fsync(int fd) {
    READY();
    return synced(fd, 0);
}
int fdatasync(int fd) {
    READY();
    return synced(fd, 1);
}

int ftruncate(int fd, off_t length) {
    READY();
    if (!tracked(fd)) return real_ftruncate(fd, length);
    pthread_mutex_lock(&journal_lock);
    int result = real_ftruncate(fd, length);
    if (result == 0) {
        int is_dir = 0;
        put_u8(OP_TRUNC);
        put_u64(inode_of(fd, &is_dir));
        put_u64((uint64_t)length);
    }
    pthread_mutex_unlock(&journal_lock);
    return result;
}

int ftruncate64(int fd, off_t length) { return ftruncate(fd, length); }

static int moved(int from_dir, const char *from, int to_dir, const char *to, unsigned int flags) {
    char full_from[PATH_MAX], full_to[PATH_MAX];
    int watched = journal_fd >= 0 && absolute(from_dir, from, full_from) == 0 &&
                  absolute(to_dir, to, full_to) == 0 &&
                  (under_root(full_from) || under_root(full_to));
    if (watched) pthread_mutex_lock(&journal_lock);
    int result = flags ? real_renameat2(from_dir, from, to_dir, to, flags)
                       : real_renameat(from_dir, from, to_dir, to);
    if (watched) {
        if (result == 0) {
            put_u8(OP_RENAME);
            put_path(full_from);
            put_path(full_to);
        }
        pthread_mutex_unlock(&journal_lock);
    }
    return result;
}

int rename(const char *from, const char *to) {
    READY();
    return moved(AT_FDCWD, from, AT_FDCWD, to, 0);
}
int renameat(int from_dir, const char *from, int to_dir, const char *to) {
    READY();
    return moved(from_dir, from, to_dir, to, 0);
}
int renameat2(int from_dir, const char *from, int to_dir, const char *to, unsigned int flags) {
    READY();
    return moved(from_dir, from, to_dir, to, flags);
}

static int removed(int dirfd, const char *path, int flags) {
    char full[PATH_MAX];
    int watched = journal_fd >= 0 && absolute(dirfd, path, full) == 0 && under_root(full);
    if (watched) pthread_mutex_lock(&journal_lock);
    int result = real_unlinkat(dirfd, path, flags);
    if (watched) {
        if (result == 0) {
            put_u8(OP_UNLINK);
            put_path(full);
        }
        pthread_mutex_unlock(&journal_lock);
    }
    return result;
}

int unlink(const char *path) {
    READY();
    return removed(AT_FDCWD, path, 0);
}
int unlinkat(int dirfd, const char *path, int flags) {
    READY();
    return removed(dirfd, path, flags);
}

int mkdir(const char *path, mode_t mode) {
    READY();
    char full[PATH_MAX];
    int watched = journal_fd >= 0 && absolute(AT_FDCWD, path, full) == 0 && under_root(full);
    if (watched) pthread_mutex_lock(&journal_lock);
    int result = real_mkdir(path, mode);
    if (watched) {
        if (result == 0) {
            put_u8(OP_MKDIR);
            put_path(full);
        }
        pthread_mutex_unlock(&journal_lock);
    }
    return result;
}
