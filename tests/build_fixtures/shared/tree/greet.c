#include "greet.h"

const char *greeting(int formal)
{
	return formal ? "good day" : "hi";
}
