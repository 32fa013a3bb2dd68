/* See match_unit_a.c. */
static __attribute__((noinline)) int scale(int x) { return x * 5 - 3; }
static __attribute__((noinline)) int same(int x) { return x ^ 0x55; }
__attribute__((noinline)) int b_fn(int x) { return scale(x) + 200; }
__attribute__((noinline)) int b_same(int x) { return same(x) + 2000; }
