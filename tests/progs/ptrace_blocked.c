/* A thread blocked in one system call that must never see EINTR (tests of Tracee.stop).
 *
 * usage: ptrace_blocked MODE   (read | epoll | sigtimedwait | sigwaitinfo | semop | recv)
 * Each line "N" on stdin is handed to the blocked thread through MODE's mechanism; it prints
 * "got N". Any failure of the blocking call (EINTR above all) prints "ERR ..." and exits 3:
 * like a program that does not retry, which is what an EINTR leak breaks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *mode;
static int fds[2];
static int semid;
static volatile int shared_value;
static pthread_t worker_thread;

static void fail(const char *what) {
    printf("ERR %s %s: %s\n", mode, what, strerror(errno));
    fflush(stdout);
    exit(3);
}

static void got(int v) {
    printf("got %d\n", v);
    fflush(stdout);
}

static void read_int(int fd) {
    int v;
    ssize_t n = read(fd, &v, sizeof v);
    if (n != (ssize_t)sizeof v) fail("read");
    got(v);
}

static void *worker(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "blocked");
    if (!strcmp(mode, "read")) {
        for (;;) read_int(fds[0]);
    } else if (!strcmp(mode, "epoll")) {
        int ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[0]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[0], &ev)) fail("epoll_ctl");
        for (;;) {
            struct epoll_event out;
            if (epoll_wait(ep, &out, 1, -1) != 1) fail("epoll_wait");
            read_int(fds[0]);
        }
    } else if (!strcmp(mode, "sigtimedwait") || !strcmp(mode, "sigwaitinfo")) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGRTMIN);
        struct timespec ts = {.tv_sec = 1000};
        for (;;) {
            siginfo_t info;
            int s = mode[3] == 't' ? sigtimedwait(&set, &info, &ts) : sigwaitinfo(&set, &info);
            if (s != SIGRTMIN) fail(mode);
            got(info.si_value.sival_int);
        }
    } else if (!strcmp(mode, "semop")) {
        for (;;) {
            struct sembuf op = {.sem_num = 0, .sem_op = -1, .sem_flg = 0};
            if (semop(semid, &op, 1)) fail("semop");
            got(shared_value);
        }
    } else if (!strcmp(mode, "recv")) {
        struct timeval tv = {.tv_sec = 1000};
        if (setsockopt(fds[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv)) fail("setsockopt");
        for (;;) {
            int v;
            if (recv(fds[0], &v, sizeof v, MSG_WAITALL) != (ssize_t)sizeof v) fail("recv");
            got(v);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    mode = argc > 1 ? argv[1] : "read";
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* inherited: only sigwait takes it */
    if (!strcmp(mode, "recv")) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds)) fail("socketpair");
    } else if (pipe(fds)) {
        fail("pipe");
    }
    semid = semget(IPC_PRIVATE, 1, 0600);
    if (semid < 0) fail("semget");
    pthread_create(&worker_thread, NULL, worker, NULL);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        int v = atoi(line);
        if (!strcmp(mode, "sigtimedwait") || !strcmp(mode, "sigwaitinfo")) {
            union sigval sv = {.sival_int = v};
            pthread_sigqueue(worker_thread, SIGRTMIN, sv);
        } else if (!strcmp(mode, "semop")) {
            shared_value = v;
            struct sembuf op = {.sem_num = 0, .sem_op = 1, .sem_flg = 0};
            if (semop(semid, &op, 1)) fail("semop post");
        } else if (write(fds[1], &v, sizeof v) != (ssize_t)sizeof v) {
            fail("write");
        }
    }
    semctl(semid, 0, IPC_RMID);
    return 0;
}
