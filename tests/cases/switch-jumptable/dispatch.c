/* Eight dense cases: gcc -O2 compiles the switch into an indirect jump through a table in
 * .rodata.dispatch whose entries are relocations into the function. */

int dispatch(int op, int a, int b)
{
	switch (op) {
	case 0: return a + b;
	case 1: return a - b;
	case 2: return a * b;
	case 3: return b ? a / b : 0;
	case 4: return a & b;
	case 5: return a | b;
	case 6: return a ^ b;
	case 7: return a << (b & 31);
	default: return -1;
	}
}
