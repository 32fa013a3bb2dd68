#include <stdio.h>

/* Like the kernel's WARN_ONCE: a function-local flag gcc numbers (warned.0, warned.1). */
#define WARN_ONCE(cond, msg)                                   \
    ({                                                         \
        static int warned;                                     \
        int hit = (cond);                                      \
        if (hit && !warned) {                                  \
            warned = 1;                                        \
            fprintf(stderr, "%s\n", msg);                      \
        }                                                      \
        hit;                                                   \
    })

int check(int x)
{
    if (WARN_ONCE(x > 5, "check: large value"))
        return 5;
    return x;
}

int scale(int x)
{
    WARN_ONCE(x < 0, "scale: negative");
    return x * 3;
}
