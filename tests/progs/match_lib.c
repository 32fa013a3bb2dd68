/* A shared library for run-pre matching (libmatch.so.1 -> libmatch.so.1.2.3). */
#include <string.h>
static int lib_calls;
int lib_table[3] = {7, 8, 9};
static __attribute__((noinline)) int lib_helper(int x) { return x + lib_table[x % 3]; }
__attribute__((noinline)) int lib_work(int x) { lib_calls++; return lib_helper(x) * 2 + lib_calls; }
__attribute__((noinline)) int lib_len(const char *s) { return (int)strlen(s) + lib_work(1); }
