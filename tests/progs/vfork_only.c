/* A single-threaded program that spends its life in vfork(): each child sleeps argv[1] ms
 * (in the program's memory) before it exits. Its one thread cannot be stopped until the
 * child is done: a remote call waiting for that waits for the child's whole life (forever
 * for a child that never exits -- any local user can run such a program). Used by
 * tests/test_remote_marker.py. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int ms = argc > 1 ? atoi(argv[1]) : 3000;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    for (;;) {
        pid_t p = vfork();
        if (p == 0) {
            usleep((useconds_t)ms * 1000);
            _exit(0);
        }
        if (p > 0) waitpid(p, 0, 0);
    }
}
