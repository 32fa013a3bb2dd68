/* Target for tests/test_remote_marker.py: the end-marker signal of a remote batch.
 *
 * usage: mark_target [seccomp=kill|errno|notif]
 *   seccomp=kill: a seccomp filter (every thread) kills the process on tgkill;
 *   seccomp=errno: the filter makes tgkill fail with EPERM (systemd's SystemCallFilter= with
 *   SystemCallErrorNumber=, a sandbox that forbids signalling);
 *   seccomp=notif: memfd_create waits for a user-space supervisor (SECCOMP_RET_USER_NOTIF,
 *   as container managers intercept calls) that never answers.
 * A thread named "host" sleeps in read() (the host of the remote calls); the main thread
 * answers commands on stdin, one per line:
 *   catch N   install a handler for signal N (from the main thread, while the host sleeps)
 *   caught    how many times a handler ran
 *   alive     "yes"
 * block_in_read() is a function that blocks in read() (a hook that never returns).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile sig_atomic_t caught;
static void on_signal(int s) { (void)s; caught++; }
static int sleep_pipe[2];

/* a "hook" that blocks in a system call until the program ends (remote_call's timeout) */
__attribute__((noipa)) int block_in_read(void) {
    char c;
    return (int)read(sleep_pipe[0], &c, 1);
}

static void *host_main(void *arg) {
    char c;
    (void)arg;
    pthread_setname_np(pthread_self(), "host");
    for (;;) if (read(sleep_pipe[0], &c, 1) <= 0) return NULL;
}

/* every thread's call nr gets action (all others are allowed); returns the listener fd of
 * SECCOMP_RET_USER_NOTIF, kept open and never read */
static int filter_call(int nr, unsigned action) {
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof code / sizeof code[0], .filter = code};
    unsigned flags = action == SECCOMP_RET_USER_NOTIF ? SECCOMP_FILTER_FLAG_NEW_LISTENER : 0;
    int fd;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
        (fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog)) < 0) {
        perror("seccomp");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "seccomp=kill")) filter_call(SYS_tgkill, SECCOMP_RET_KILL_PROCESS);
    if (argc > 1 && !strcmp(argv[1], "seccomp=errno")) filter_call(SYS_tgkill, SECCOMP_RET_ERRNO | EPERM);
    if (argc > 1 && !strcmp(argv[1], "seccomp=notif")) filter_call(SYS_memfd_create, SECCOMP_RET_USER_NOTIF);
    if (pipe(sleep_pipe)) return 1;
    pthread_t th;
    pthread_create(&th, NULL, host_main, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "catch ", 6)) {
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = on_signal;
            sa.sa_flags = SA_RESTART;
            sigaction(atoi(line + 6), &sa, NULL);
            printf("ok\n");
        } else if (!strncmp(line, "caught", 6)) {
            printf("%d\n", (int)caught);
        } else if (!strncmp(line, "alive", 5)) {
            printf("yes\n");
        }
    }
    return 0;
}
