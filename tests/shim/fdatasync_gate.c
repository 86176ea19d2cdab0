/* LD_PRELOAD shim for tests/integration/durability.rs: puts the test in charge of fdatasync, the
 * durability barrier prenota's committer calls after sled's flush.
 *
 * With PRENOTA_FSYNC_SHIM_DIR=DIR in the environment:
 *   DIR/fail exists  -> fdatasync fails with EIO, like a dying disk;
 *   DIR/gate exists  -> fdatasync creates DIR/waiting, then waits until DIR/gate is
 *                       removed, then syncs for real.
 * Without the variable, or without those files, it is the real fdatasync. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static int exists(const char *dir, const char *name) {
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &st) == 0;
}

static void touch(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT, 0600);
    if (fd >= 0) close(fd);
}

int fdatasync(int fd) {
    static int (*real_fdatasync)(int) = NULL;
    if (real_fdatasync == NULL) {
        real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    const char *dir = getenv("PRENOTA_FSYNC_SHIM_DIR");
    if (dir != NULL) {
        if (exists(dir, "fail")) {
            errno = EIO;
            return -1;
        }
        if (exists(dir, "gate")) {
            touch(dir, "waiting");
            while (exists(dir, "gate")) {
                usleep(1000);
            }
        }
    }
    return real_fdatasync(fd);
}
