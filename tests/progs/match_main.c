/* Test program for run-pre matching and loading (tests/test_match.py, test_load.py).
 * Reads one command per line on stdin and answers one line, so a test decides exactly when
 * patched code runs. At start it maps a memfd named "livesplice-test" (read/write/execute)
 * near its own code, standing in for the region remote_mmap would create. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

extern int a_fn(int), b_fn(int), a_same(int), b_same(int);
extern __thread int ext_tls; /* defined in match_unit_a.c: initial-exec access */
static int counter;
__thread int tls_counter;
int table[4] = {1, 2, 3, 4};
char outbuf[128];

static __attribute__((noinline)) int helper(int x) { return x * 3 + counter; }
__attribute__((noinline)) int work(int x) { counter++; return helper(x) + table[x & 3]; }
__attribute__((noinline)) int tiny(int x) { return x; }
static __attribute__((noinline)) int step2(int x) { return x * 7 + 3; }
__attribute__((noinline)) int step1(int x) { if (x > 10) return step2(x - 1); return x + 1; }
__attribute__((noinline)) int greet(int v) { return snprintf(outbuf, sizeof outbuf, "hello %d", v); }
__attribute__((noinline)) int copy(int n) {
    char tmp[64];
    memcpy(tmp, "abcdefghijklmnopqrstuvwxyz", (size_t)n & 15);
    tmp[n & 15] = 0;
    return (int)strlen(tmp) + tmp[0];
}
__attribute__((noinline)) int tls_bump(int n) { tls_counter += n; ext_tls += 2 * n; return tls_counter + ext_tls; }
int (*volatile fptr)(int) = tiny;
/* calls to global functions of another unit: with -fPIC -fno-plt these are
 * call/jmp *f@GOTPCREL(%rip), which ld relaxes to addr32 call f / jmp f; nop */
__attribute__((noinline)) int chain(int x) { return a_fn(x) * 2; }
__attribute__((noinline)) int chain_tail(int x) { return b_fn(x + 1); }

static void *region;

static void map_region(void) {
    int fd = memfd_create("livesplice-test", 0);
    size_t size = 1 << 20;
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) { perror("memfd"); exit(1); }
    uintptr_t here = (uintptr_t)&work & ~(uintptr_t)0xfffff;
    long steps[] = {256, -256, 512, -512, 1024};
    for (unsigned i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        uintptr_t hint = here + (uintptr_t)(steps[i] * (1L << 20));
        void *p = mmap((void *)hint, size, PROT_READ | PROT_WRITE | PROT_EXEC,
                       MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0);
        if (p != MAP_FAILED) { region = p; return; }
    }
    perror("mmap"); exit(1);
}

int main(void) {
    char line[128];
    map_region();
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = "";
        int n = 0;
        sscanf(line, "%31s %d", cmd, &n);
        if (!strcmp(cmd, "hello")) printf("ready %p\n", region);
        else if (!strcmp(cmd, "work")) printf("%d\n", work(n));
        else if (!strcmp(cmd, "step")) printf("%d\n", step1(n));
        else if (!strcmp(cmd, "a")) printf("%d %d\n", a_fn(n), a_same(n));
        else if (!strcmp(cmd, "b")) printf("%d %d\n", b_fn(n), b_same(n));
        else if (!strcmp(cmd, "greet")) { greet(n); printf("%s\n", outbuf); }
        else if (!strcmp(cmd, "copy")) printf("%d\n", copy(n));
        else if (!strcmp(cmd, "tls")) printf("%d\n", tls_bump(n));
        else if (!strcmp(cmd, "chain")) printf("%d %d\n", chain(n), chain_tail(n));
        else if (!strcmp(cmd, "tiny")) printf("%d\n", fptr(n));
        else printf("?\n");
    }
    return 0;
}
