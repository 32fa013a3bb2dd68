/* Target for tests/test_remote_robust.py: threads whose state a hijack must leave exact.
 *
 * usage: ptrace_robust
 *   main thread:   blocked in read() on stdin (-ERESTARTSYS when interrupted); each line "N"
 *                  is answered "got N"; "count" answers "count R S C" (regcheck loops,
 *                  sleeper wake-ups, completed calls of slow());
 *   "sleeper":     nanosleep(1 ms) in a loop (-ERESTART_RESTARTBLOCK when interrupted);
 *   "epoller":     epoll_wait(-1) on a pipe nobody writes (returns -EINTR when interrupted;
 *                  an EINTR that reaches the program prints "EINTR epoll_wait", goes on);
 *   "regcheck":    an assembly loop holding known values in every general register it can
 *                  (and comparing them each turn): a register restored wrong is caught.
 * Any failure (EINTR above all, a register changed) prints "ERR ..." and exits 3.
 * Functions for remote calls: answer() = 42, slow() sleeps 300 ms then returns 7.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

static volatile long regcheck_loops, sleeper_wakeups, slow_calls;

static void fail(const char *what) {
    printf("ERR %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(3);
}

__attribute__((noipa)) int answer(void) { return 42; }

__attribute__((noipa)) int slow(void) {
    struct timespec ts = {0, 300 * 1000 * 1000};
    while (nanosleep(&ts, &ts)) if (errno != EINTR) fail("slow nanosleep");
    slow_calls++;
    return 7;
}

static void *sleeper(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "sleeper");
    for (;;) {
        struct timespec ts = {0, 1000 * 1000};
        if (nanosleep(&ts, NULL)) fail("nanosleep");
        sleeper_wakeups++;
    }
    return NULL;
}

static void *epoller(void *arg) {
    int p[2];
    (void)arg;
    pthread_setname_np(pthread_self(), "epoller");
    if (pipe(p)) fail("pipe");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = p[0]};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev)) fail("epoll_ctl");
    struct epoll_event out;
    for (;;) {
        if (epoll_wait(ep, &out, 1, -1) >= 0 || errno != EINTR) fail("epoll_wait returned");
        /* reported, not fatal: see test_killed_at_random_times */
        printf("EINTR epoll_wait\n");
        fflush(stdout);
    }
    return NULL;
}

static void *regcheck(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "regcheck");
    /* rbx rdx rsi rdi r8-r15 (and rbp) hold constants for ever; rax is scratch for the
     * comparisons (cmp; jne: flags live in between); the counter is bumped in memory. */
    __asm__ volatile(
        "movabs $0x1111111111111111, %%rbx\n\t"
        "movabs $0x2222222222222222, %%rdx\n\t"
        "movabs $0x3333333333333333, %%rsi\n\t"
        "movabs $0x4444444444444444, %%rdi\n\t"
        "movabs $0x5555555555555555, %%r8\n\t"
        "movabs $0x6666666666666666, %%r9\n\t"
        "movabs $0x7777777777777777, %%r10\n\t"
        "movabs $0x0888888888888888, %%r11\n\t"
        "movabs $0x0999999999999999, %%r12\n\t"
        "movabs $0x0aaaaaaaaaaaaaaa, %%r13\n\t"
        "movabs $0x0bbbbbbbbbbbbbbb, %%r14\n\t"
        "movabs $0x0ccccccccccccccc, %%r15\n\t"
        "push %%rbp\n\t"
        "movabs $0x0ddddddddddddddd, %%rbp\n\t"
        "1:\n\t"
        "movabs $0x1111111111111111, %%rax\n\tcmp %%rax, %%rbx\n\tjne 2f\n\t"
        "movabs $0x2222222222222222, %%rax\n\tcmp %%rax, %%rdx\n\tjne 2f\n\t"
        "movabs $0x3333333333333333, %%rax\n\tcmp %%rax, %%rsi\n\tjne 2f\n\t"
        "movabs $0x4444444444444444, %%rax\n\tcmp %%rax, %%rdi\n\tjne 2f\n\t"
        "movabs $0x5555555555555555, %%rax\n\tcmp %%rax, %%r8\n\tjne 2f\n\t"
        "movabs $0x6666666666666666, %%rax\n\tcmp %%rax, %%r9\n\tjne 2f\n\t"
        "movabs $0x7777777777777777, %%rax\n\tcmp %%rax, %%r10\n\tjne 2f\n\t"
        "movabs $0x0888888888888888, %%rax\n\tcmp %%rax, %%r11\n\tjne 2f\n\t"
        "movabs $0x0999999999999999, %%rax\n\tcmp %%rax, %%r12\n\tjne 2f\n\t"
        "movabs $0x0aaaaaaaaaaaaaaa, %%rax\n\tcmp %%rax, %%r13\n\tjne 2f\n\t"
        "movabs $0x0bbbbbbbbbbbbbbb, %%rax\n\tcmp %%rax, %%r14\n\tjne 2f\n\t"
        "movabs $0x0ccccccccccccccc, %%rax\n\tcmp %%rax, %%r15\n\tjne 2f\n\t"
        "movabs $0x0ddddddddddddddd, %%rax\n\tcmp %%rax, %%rbp\n\tjne 2f\n\t"
        "lock incq %0\n\t"
        "jmp 1b\n\t"
        "2:\n\t"
        "pop %%rbp\n\t"
        : "+m"(regcheck_loops)
        :
        : "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
          "r14", "r15", "cc", "memory");
    printf("ERR regcheck: a register changed\n");
    fflush(stdout);
    exit(3);
    return NULL;
}

int main(void) {
    pthread_t th;
    pthread_create(&th, NULL, sleeper, NULL);
    pthread_create(&th, NULL, epoller, NULL);
    pthread_create(&th, NULL, regcheck, NULL);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    for (;;) {
        ssize_t n = read(0, line, sizeof line - 1);
        if (n < 0) fail("read");
        if (n == 0) return 0;
        line[n] = 0;
        if (!strncmp(line, "count", 5))
            printf("count %ld %ld %ld\n", regcheck_loops, sleeper_wakeups, slow_calls);
        else
            printf("got %d\n", atoi(line));
        fflush(stdout);
    }
}
