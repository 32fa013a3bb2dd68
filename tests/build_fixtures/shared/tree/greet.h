const char *greeting(int formal);
