/* Per-call cost of a function reached through a 5-byte jmp rel32 at its old entry, against
 * calling the replacement directly; both measured in this one process, rounds interleaved.
 *
 * usage: call_overhead [calls_per_round] [rounds]
 * Prints one line per round: "round direct_ns jmp_ns" (nanoseconds per call).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

__attribute__((noipa)) int f_old(int x) { return x + 1; }
__attribute__((noipa)) int f_new(int x) { return x + 2; }

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* The trampoline livesplice writes: e9 rel32 at f_old, rel32 = f_new - (f_old + 5). */
static void write_jmp(void) {
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t at = (uintptr_t)f_old;
    void *start = (void *)(at & ~(uintptr_t)(page - 1));
    if (mprotect(start, 2 * page, PROT_READ | PROT_WRITE | PROT_EXEC)) exit(2);
    int32_t rel = (int32_t)((intptr_t)f_new - (intptr_t)(at + 5));
    unsigned char insn[5] = {0xe9};
    memcpy(insn + 1, &rel, 4);
    memcpy((void *)at, insn, 5);
    if (mprotect(start, 2 * page, PROT_READ | PROT_EXEC)) exit(2);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000000L;
    int rounds = argc > 2 ? atoi(argv[2]) : 9;
    write_jmp();
    if (f_old(1) != 3) return 3; /* the jump is in place */
    volatile int sink = 0;
    for (int r = 0; r < rounds; r++) {
        int acc = 0;
        double t0 = now_ns();
        for (long i = 0; i < n; i++) acc += f_new((int)i);
        double t1 = now_ns();
        for (long i = 0; i < n; i++) acc += f_old((int)i);
        double t2 = now_ns();
        sink += acc;
        printf("%d %.4f %.4f\n", r, (t1 - t0) / n, (t2 - t1) / n);
        fflush(stdout);
    }
    return sink == 12345 ? 1 : 0;
}
