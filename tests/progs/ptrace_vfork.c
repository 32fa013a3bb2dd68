/* A thread that vforks children which live a while before they exit (argv[1] ms each);
 * with argv[2] "busy" the other two threads spin instead of sleeping.
 *
 * The vforking thread waits in the kernel (killable only) until its child execs or exits:
 * PTRACE_INTERRUPT cannot stop it before, so a stop of "every thread" waits as long as the
 * child lives -- with every other thread of the program held stopped meanwhile. The child
 * shares the program's memory and runs its code. Used by tests/test_ptrace_vfork.py. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static int child_ms = 2000;
static int busy;
static volatile unsigned long ticks;

static void *vforker(void *arg) {
    (void)arg;
    for (;;) {
        pid_t p = vfork();
        if (p == 0) {
            usleep((useconds_t)child_ms * 1000);
            _exit(0);
        }
        if (p > 0)
            waitpid(p, 0, 0);
    }
    return 0;
}

static void *ticker(void *arg) {
    (void)arg;
    for (;;) {
        ticks++;
        if (!busy)
            usleep(1000);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1)
        child_ms = atoi(argv[1]);
    busy = argc > 2 && argv[2][0] == 'b';
    pthread_t t;
    pthread_create(&t, 0, ticker, 0);
    pthread_create(&t, 0, vforker, 0);
    printf("ready\n");
    fflush(stdout);
    for (;;)
        if (!busy)
            pause();
        else
            ticks++;
}
