int scale(int x);
int offset(int x);
