/* See match_reloc.c. */
int ext_var = 42;
int ext_fn(int x) { return x * 2; }
void _start(void) { for (;;) ; }
