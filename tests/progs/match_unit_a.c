/* Two units with static functions of the same name: one differs, one is identical. */
__thread int ext_tls = 5;
static __attribute__((noinline)) int scale(int x) { return x * 2 + 1; }
static __attribute__((noinline)) int same(int x) { return x ^ 0x55; }
__attribute__((noinline)) int a_fn(int x) { return scale(x) + 100; }
__attribute__((noinline)) int a_same(int x) { return same(x) + 1000; }
