/* Relocation oracle (tests/test_relocate.py): linked by ld, relocated by livesplice. */
extern int ext_var;
extern int ext_fn(int);
int local_var = 3;
int arr[8];
static __attribute__((noinline)) int sfn(int x) { return x + 1; }
int (*ptrs[2])(int) = {sfn, ext_fn};            /* R_X86_64_64 */
const char *msg = "relocated";                  /* R_X86_64_64 to a string */
__attribute__((noinline)) int user(int x) {     /* PLT32, PC32, 32S */
    return ext_fn(x) + sfn(x) + ext_var + arr[x & 7] + local_var + msg[x & 3];
}
unsigned addr_of(void) { return (unsigned)(unsigned long)&local_var; } /* R_X86_64_32 */
__attribute__((noinline)) int tail(int x) { return ext_fn(x + 1); }      /* jmp PLT32 */
