/* Target that measures, from inside, how long its threads wait for a tracer outside a stop
 * window: the two stops a traced thread meets without anyone asking for them.
 *
 *   "sender" sends SIGUSR1 to "receiver" (tgkill) every ms, one at a time: the next only
 *            after the handler ran. The handler records send -> handler latency: a traced
 *            receiver sits in a signal-delivery-stop until its tracer passes the signal on.
 *   "joiner" creates a thread that lives 3 ms and joins it, over and over, recording the
 *            latency from the thread's last instruction to the join's return: with
 *            PTRACE_O_TRACEEXIT a traced thread stops at its exit until its tracer lets it
 *            go, and pthread_join waits for that.
 * The main thread (the natural host of a remote call: it sleeps in read()) answers on stdin:
 *   reset   zero the maxima and counts
 *   stats   "SIG_MAX_US SIG_COUNT JOIN_MAX_US JOIN_COUNT"
 *   tids    "RECEIVER SENDER JOINER"
 * Used by tests/test_ptrace_outside.py and benchmarks/bench_outside_stops.py. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile pid_t receiver_tid, sender_tid, joiner_tid;
static volatile unsigned long sent_seq, handled_seq;
static volatile long long sent_ns;
static volatile long long sig_max_ns, join_max_ns;
static volatile unsigned long sig_count, join_count;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void nap_us(long us) {
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, 0);
}

static void on_usr1(int s) {
    (void)s;
    long long lat = now_ns() - sent_ns;
    if (lat > sig_max_ns) sig_max_ns = lat;
    sig_count++;
    __atomic_store_n(&handled_seq, sent_seq, __ATOMIC_RELEASE);
}

static void *receiver(void *arg) {
    (void)arg;
    receiver_tid = (pid_t)syscall(SYS_gettid);
    for (;;) pause();
    return 0;
}

static void *sender(void *arg) {
    (void)arg;
    sender_tid = (pid_t)syscall(SYS_gettid);
    while (!receiver_tid) nap_us(100);
    for (;;) {
        if (__atomic_load_n(&handled_seq, __ATOMIC_ACQUIRE) == sent_seq) {
            sent_ns = now_ns();
            __atomic_store_n(&sent_seq, sent_seq + 1, __ATOMIC_RELEASE);
            syscall(SYS_tgkill, getpid(), receiver_tid, SIGUSR1);
        }
        nap_us(1000);
    }
    return 0;
}

/* lives 3 ms, so that a stop window of the tracer often finds (and seizes) it */
static void *short_lived(void *arg) {
    nap_us(3000);
    *(long long *)arg = now_ns();
    return 0;
}

static void *joiner(void *arg) {
    (void)arg;
    joiner_tid = (pid_t)syscall(SYS_gettid);
    for (;;) {
        pthread_t t;
        long long ended = 0;
        if (pthread_create(&t, 0, short_lived, &ended) == 0) {
            pthread_join(t, 0);
            long long lat = now_ns() - ended;
            if (lat > join_max_ns) join_max_ns = lat;
            join_count++;
        }
        nap_us(1000);
    }
    return 0;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, 0);
    /* only the receiver takes SIGUSR1 (tgkill names it anyway; this is for a stray kill) */
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_t t;
    pthread_create(&t, 0, receiver, 0);
    pthread_sigmask(SIG_BLOCK, &usr1, 0);
    pthread_create(&t, 0, sender, 0);
    pthread_create(&t, 0, joiner, 0);
    while (!receiver_tid || !sender_tid || !joiner_tid) nap_us(100);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "reset", 5)) {
            sig_max_ns = join_max_ns = 0;
            sig_count = join_count = 0;
            printf("ok\n");
        } else if (!strncmp(line, "stats", 5)) {
            printf("%lld %lu %lld %lu\n", sig_max_ns / 1000, sig_count, join_max_ns / 1000,
                   join_count);
        } else if (!strncmp(line, "tids", 4)) {
            printf("%d %d %d\n", receiver_tid, sender_tid, joiner_tid);
        } else {
            printf("?\n");
        }
        fflush(stdout);
    }
    return 0;
}
