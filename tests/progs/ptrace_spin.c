/* Target for the ptrace/stop-window tests and benchmarks.
 *
 * usage: ptrace_spin NWORKERS [stuck] [deep] [churn] [exit_after_ms=N] [sleepers]
 *   workers spin in and around target_fn (a long loop around one short call);
 *   stuck: a thread named "stuck" never leaves stuck_fn;
 *   deep: a thread named "deep" sits in deep_fn -> deep_inner (blocked in pause());
 *   churn: a thread creates short-lived threads forever;
 *   sleepers: workers block in read() instead of spinning (benchmarks);
 *   hot: workers loop through hot_outer() -> hot_inner() (nearly all their time in the two,
 *        a short usleep every 1024 turns): the busy path of the stop window (benchmarks);
 *   holder: a thread named "holder" keeps a pointer to answer() in its stack frame and
 *           sleeps (a stale word that a conservative stack scan mistakes for a frame);
 *   catch=N,M..: count signals N, M... in a handler; block=N,M..: every thread blocks them;
 *   idle: a thread named "idle" waits on a condition variable (a futex) forever.
 * Commands on stdin, one per line, answered on stdout: seen, calls, usr1, counter, caught,
 * quit.
 * With 0 workers the main thread spins itself and polls stdin (single-thread process).
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAXW 1024
static volatile int seen_new[MAXW];
static volatile long calls[MAXW];
static volatile sig_atomic_t usr1;
static volatile int counter;
static int sleep_pipe[2];

/* noipa: no inlining and no interprocedural constant propagation, so callers really call
 * whatever the entry of target_fn jumps to. */
__attribute__((noipa)) int target_fn(int x) { return x + 1; }
__attribute__((noipa)) int other_fn(int x) { return x + 1001; }
__attribute__((noipa)) void stuck_fn(void) { for (;;) __asm__ volatile("" ::: "memory"); }
__attribute__((noipa)) void deep_inner(void) { for (;;) pause(); }
__attribute__((noipa)) void deep_fn(void) { deep_inner(); __asm__ volatile("" ::: "memory"); }
/* remote_call targets */
__attribute__((noipa)) int answer(void) { return 42; }
__attribute__((noipa)) int add3(int a, int b, int c) { return a + b * 10 + c * 100; }
__attribute__((noipa)) int minus_seven(void) { return -7; }
__attribute__((noipa)) int bump(void) { return ++counter; }
static int *volatile bad_pointer = (int *)8;
__attribute__((noipa)) int crash(void) { *bad_pointer = 1; return 0; }
__attribute__((noipa)) int forever(void) { for (;;) __asm__ volatile("" ::: "memory"); }

__attribute__((noipa)) int hot_inner(int x) { return x + 1; }
__attribute__((noipa)) int hot_outer(int x) { return hot_inner(x) + hot_inner(x + 1) - x - 1; }

static void *hot_worker(void *arg) {
    long id = (long)arg;
    for (int i = 0;; i++) {
        calls[id] += hot_outer(i) - i;
        if ((i & 1023) == 0) usleep(100);
    }
    return NULL;
}

static void on_usr1(int s) { (void)s; usr1++; }
static volatile sig_atomic_t caught;
static void on_caught(int s) { (void)s; caught++; }

/* "N,M,...": each signal number passed to fn */
static void each_signal(const char *list, void (*fn)(int)) {
    for (const char *p = list; *p;) {
        fn(atoi(p));
        while (*p && *p != ',') p++;
        if (*p) p++;
    }
}
static void catch_one(int s) { signal(s, on_caught); }
static sigset_t blocked;
static void block_one(int s) { sigaddset(&blocked, s); }

static void work_once(long id, unsigned *x) {
    for (int i = 0; i < 2000; i++) *x = *x * 1103515245u + 12345u;
    int arg = (int)(*x & 0xff);
    if (target_fn(arg) - arg == 1001) seen_new[id] = 1;
    calls[id]++;
}

static void *worker(void *arg) {
    long id = (long)arg;
    char name[16];
    snprintf(name, sizeof name, "worker-%ld", id);
    pthread_setname_np(pthread_self(), name);
    unsigned x = (unsigned)id + 1;
    for (;;) work_once(id, &x);
    return NULL;
}

static void *sleeper(void *arg) {
    char c;
    (void)arg;
    for (;;) if (read(sleep_pipe[0], &c, 1) < 0) return NULL;
}

static void *stuck_main(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "stuck");
    stuck_fn();
    return NULL;
}

static void *deep_main(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "deep");
    deep_fn();
    return NULL;
}

static void *holder_main(void *arg) {
    int (*volatile fp)(void) = answer;
    (void)arg;
    pthread_setname_np(pthread_self(), "holder");
    for (;;) pause();
    return (void *)fp;
}

static void *short_lived(void *arg) {
    unsigned x = (unsigned)(long)arg;
    for (int i = 0; i < 50; i++) work_once(MAXW - 1, &x);
    return NULL;
}

static pthread_mutex_t idle_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t idle_cond = PTHREAD_COND_INITIALIZER;
static void *idle_main(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "idle");
    pthread_mutex_lock(&idle_lock);
    for (;;) pthread_cond_wait(&idle_cond, &idle_lock);
    return NULL;
}

static void *churn_main(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "churn");
    for (long n = 0;; n++) {
        pthread_t th[4];
        for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, short_lived, (void *)n);
        for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    }
    return NULL;
}

static void *exit_main(void *arg) {
    usleep((useconds_t)(long)arg * 1000);
    exit(0);
}

static void answer_command(const char *line) {
    if (!strncmp(line, "seen", 4)) {
        int n = 0;
        for (int i = 0; i < MAXW; i++) n += seen_new[i];
        printf("%d\n", n);
    } else if (!strncmp(line, "calls", 5)) {
        long n = 0;
        for (int i = 0; i < MAXW; i++) n += calls[i];
        printf("%ld\n", n);
    } else if (!strncmp(line, "usr1", 4)) {
        printf("%d\n", (int)usr1);
    } else if (!strncmp(line, "caught", 6)) {
        printf("%d\n", (int)caught);
    } else if (!strncmp(line, "counter", 7)) {
        printf("%d\n", counter);
    } else if (!strncmp(line, "quit", 4)) {
        exit(0);
    } else {
        printf("?\n");
    }
    fflush(stdout);
}

int main(int argc, char **argv) {
    int nworkers = argc > 1 ? atoi(argv[1]) : 0;
    int sleepers = 0;
    pthread_t th;
    signal(SIGUSR1, on_usr1);
    if (pipe(sleep_pipe)) return 1;
    sigemptyset(&blocked);
    for (int i = 2; i < argc; i++) {
        if (!strncmp(argv[i], "catch=", 6)) each_signal(argv[i] + 6, catch_one);
        if (!strncmp(argv[i], "block=", 6)) each_signal(argv[i] + 6, block_one);
    }
    pthread_sigmask(SIG_BLOCK, &blocked, NULL); /* inherited by every thread */
    int hot = 0;
    for (int i = 2; i < argc; i++) if (!strcmp(argv[i], "sleepers")) sleepers = 1;
    for (int i = 2; i < argc; i++) if (!strcmp(argv[i], "hot")) hot = 1;
    for (long i = 0; i < nworkers && i < MAXW - 1; i++)
        pthread_create(&th, NULL, sleepers ? sleeper : hot ? hot_worker : worker, (void *)i);
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "stuck")) pthread_create(&th, NULL, stuck_main, NULL);
        if (!strcmp(argv[i], "deep")) pthread_create(&th, NULL, deep_main, NULL);
        if (!strcmp(argv[i], "churn")) pthread_create(&th, NULL, churn_main, NULL);
        if (!strcmp(argv[i], "idle")) pthread_create(&th, NULL, idle_main, NULL);
        if (!strcmp(argv[i], "holder")) pthread_create(&th, NULL, holder_main, NULL);
        if (!strncmp(argv[i], "exit_after_ms=", 14))
            pthread_create(&th, NULL, exit_main, (void *)(long)atoi(argv[i] + 14));
    }
    printf("ready\n");
    fflush(stdout);
    char line[128];
    if (nworkers == 0) {
        unsigned x = 1;
        struct pollfd p = {.fd = 0, .events = POLLIN};
        for (long n = 0;; n++) {
            work_once(0, &x);
            if (n % 64 == 0 && poll(&p, 1, 0) == 1) {
                if (!fgets(line, sizeof line, stdin)) return 0;
                answer_command(line);
            }
        }
    }
    while (fgets(line, sizeof line, stdin)) answer_command(line);
    return 0;
}
