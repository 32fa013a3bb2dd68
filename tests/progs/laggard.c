/* Target with a thread the scheduler keeps off the CPU (a laggard) and one that must not
 * wait for it.
 *
 *   "loop"  pinned to CPU 0: sleeps 100 us at a time and records the longest gap between
 *           two wake-ups beyond the sleep (what a stop of it costs, seen from inside);
 *   "idle"  pinned to CPU 1: waits on a condition variable for ever (a pool's idle thread).
 * The main thread answers on stdin:
 *   reset   zero the longest gap
 *   stats   "GAP_US" (after two more iterations of the loop thread)
 *   tids    "LOOP IDLE"
 *   exec MS     a new thread sleeps MS ms, then execve()s this program as "laggard execd",
 *               which prints "execd" and answers "execd" to every line (exec by a thread)
 *   epoll       a new thread waits in epoll_wait() for ever (pinned to CPU 0, so a quick
 *               thread); "eintrs" prints how often a wait failed with EINTR
 *   vfork MS    a new thread sleeps MS ms, then vfork()s a child that sleeps 1 s and exits
 *               (a thread that waits in vfork: it cannot be stopped until then)
 *   spawn MS N  a new thread sleeps MS ms, then creates N threads that each sleep 100 ms
 *               and exit (threads created and ending while a stop is under way); "ok" at once
 *
 * Run as "laggard hog MS [CPU]": a separate process that takes CPU 1 (or CPU) with SCHED_FIFO
 * priority 2 (above livesplice's 1) for MS ms, printing "spinning" first ("no-fifo" if not
 * allowed): while it spins the idle thread, woken by an interrupt, cannot run, so cannot stop.
 * Used by tests/test_stagger.py. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile pid_t loop_tid, idle_tid;
static volatile long long gap_max_ns;
static volatile unsigned long iterations;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void *loop(void *arg) {
    (void)arg;
    pin(0);
    pthread_setname_np(pthread_self(), "loop");
    loop_tid = (pid_t)syscall(SYS_gettid);
    struct timespec nap = {0, 100000};
    long long last = now_ns();
    for (;;) {
        nanosleep(&nap, 0);
        long long now = now_ns();
        long long gap = now - last - 100000;
        if (gap > gap_max_ns) gap_max_ns = gap;
        last = now;
        iterations++;
    }
    return 0;
}

static void *idle(void *arg) {
    (void)arg;
    pin(1);
    pthread_setname_np(pthread_self(), "idle");
    idle_tid = (pid_t)syscall(SYS_gettid);
    pthread_mutex_lock(&mu);
    for (;;) pthread_cond_wait(&cv, &mu);
    return 0;
}

__attribute__((noinline)) static int hog(long ms, int cpu) {
    pin(cpu);
    struct sched_param p = {.sched_priority = 2};
    if (sched_setscheduler(0, SCHED_FIFO, &p) != 0) {
        printf("no-fifo\n");
        return 1;
    }
    printf("spinning\n");
    fflush(stdout);
    long long end = now_ns() + ms * 1000000LL;
    while (now_ns() < end) {
    }
    return 0;
}

static char *self_exe;

static void *exec_later(void *arg) {
    struct timespec ts = {0, (long)arg * 1000000L};
    nanosleep(&ts, 0);
    char *args[] = {"laggard", "execd", 0};
    execv(self_exe, args);
    perror("execv");
    return 0;
}

static void *short_life(void *arg) {
    (void)arg;
    struct timespec ts = {0, 100000000L};
    nanosleep(&ts, 0);
    return 0;
}

static volatile long eintrs;

static void *epoll_forever(void *arg) {
    (void)arg;
    pin(0);
    int ep = epoll_create1(0);
    struct epoll_event ev;
    for (;;)
        if (epoll_wait(ep, &ev, 1, -1) < 0 && errno == EINTR) eintrs++;
    return 0;
}

static void *vfork_later(void *arg) {
    struct timespec ts = {0, (long)arg * 1000000L};
    nanosleep(&ts, 0);
    if (vfork() == 0) {
        struct timespec second = {1, 0};
        syscall(SYS_nanosleep, &second, 0);
        _exit(0);
    }
    return 0;
}

static long spawn_n;

static void *spawn_later(void *arg) {
    struct timespec ts = {0, (long)arg * 1000000L};
    nanosleep(&ts, 0);
    for (long i = 0; i < spawn_n; i++) {
        pthread_t t;
        if (pthread_create(&t, 0, short_life, 0) == 0) pthread_detach(t);
    }
    return 0;
}

static void later(void *(*fn)(void *), long ms) {
    pthread_t t;
    pthread_create(&t, 0, fn, (void *)ms);
    pthread_detach(t);
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "hog") == 0) return hog(atol(argv[2]), argc > 3 ? atoi(argv[3]) : 1);
    if (argc == 2 && strcmp(argv[1], "execd") == 0) {
        char l[64];
        setvbuf(stdout, 0, _IOLBF, 0);
        printf("execd\n");
        while (fgets(l, sizeof l, stdin)) printf("execd\n");
        return 0;
    }
    self_exe = realpath("/proc/self/exe", 0);
    pthread_t a, b;
    pthread_create(&a, 0, loop, 0);
    pthread_create(&b, 0, idle, 0);
    while (!loop_tid || !idle_tid) usleep(1000);
    setvbuf(stdout, 0, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "reset", 5) == 0) {
            gap_max_ns = 0;
            printf("ok\n");
        } else if (strncmp(line, "stats", 5) == 0) {
            /* the gap a stop made is recorded once the loop thread woke after it */
            unsigned long seen = iterations;
            while (iterations < seen + 2) usleep(100);
            printf("%lld\n", gap_max_ns / 1000);
        } else if (strncmp(line, "tids", 4) == 0) {
            printf("%d %d\n", loop_tid, idle_tid);
        } else if (strncmp(line, "exec ", 5) == 0) {
            later(exec_later, atol(line + 5));
            printf("ok\n");
        } else if (strncmp(line, "epoll", 5) == 0) {
            later(epoll_forever, 0);
            printf("ok\n");
        } else if (strncmp(line, "eintrs", 6) == 0) {
            printf("%ld\n", eintrs);
        } else if (strncmp(line, "vfork ", 6) == 0) {
            later(vfork_later, atol(line + 6));
            printf("ok\n");
        } else if (strncmp(line, "spawn ", 6) == 0) {
            char *rest;
            long ms = strtol(line + 6, &rest, 10);
            spawn_n = atol(rest);
            later(spawn_later, ms);
            printf("ok\n");
        }
    }
    return 0;
}
