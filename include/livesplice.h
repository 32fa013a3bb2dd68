/*
 * livesplice.h - macros for authors of live patches (livesplice create/apply).
 *
 * HOOKS
 * -----
 * A hook is a function `int fn(void)` in the patched source that returns 0 on success.
 * Register it with one of the macros below; apply runs it in the target process:
 *
 *   LIVESPLICE_PRE_APPLY(fn)    before the stop window (may fail: the update is not applied)
 *   LIVESPLICE_APPLY(fn)        inside the stop window, every thread stopped; keep it short
 *   LIVESPLICE_POST_APPLY(fn)   after the jumps are written and threads resumed
 *   LIVESPLICE_FAIL_APPLY(fn)   when applying failed after PRE_APPLY succeeded (clean up)
 *
 * and the mirrors for `livesplice undo`:
 *
 *   LIVESPLICE_PRE_REVERSE(fn)  LIVESPLICE_REVERSE(fn)
 *   LIVESPLICE_POST_REVERSE(fn) LIVESPLICE_FAIL_REVERSE(fn)
 *
 * Example: the patch changes the initial value of `static int limit = 10;` to 20. The diff
 * refuses that (the running program already has, and may have changed, `limit`). Instead
 * keep the old initializer and set the value when the update goes in:
 *
 *   static int limit = 10;
 *   static int raise_limit(void) { if (limit < 20) limit = 20; return 0; }
 *   LIVESPLICE_APPLY(raise_limit);
 *
 * How it works: each macro stores a pointer to `fn` in a section named
 * `.livesplice.hook.<kind>`. The diff finds these sections in the patched object, ships the
 * hook function (and what it references) with role "hook", and lists it in the update's
 * hooks. The pointer itself is not shipped: it is not "new data". Without livesplice (a
 * normal build of the patched tree) the section is just a few unused bytes.
 *
 * SHADOW VARIABLES (new data for a data change)
 * ---------------------------------------------
 * Existing data cannot grow or change its layout: objects already in memory keep their old
 * size. Put the new state next to it instead. The simple form is a new static variable in
 * the patch: the update loads it zero-initialized (or with its initializer) and the new code
 * uses it; the running code never knew it:
 *
 *   struct conn { int fd; char name[32]; };       // unchanged: cannot grow
 *
 *   +static unsigned conn_name_overflows;          // new data: allowed
 *   +static char conn_long_name[64][256];          // wider buffer, indexed by fd
 *
 * For per-object state keep a small table keyed by the object's address (or its fd/id),
 * allocated and filled in a LIVESPLICE_APPLY / LIVESPLICE_POST_APPLY hook, and freed in a
 * LIVESPLICE_REVERSE hook. Never add a member to an existing struct: the diff refuses it.
 */
#ifndef LIVESPLICE_H
#define LIVESPLICE_H

#define LIVESPLICE_CONCAT_(a, b) a##b
#define LIVESPLICE_CONCAT(a, b) LIVESPLICE_CONCAT_(a, b)

/* `used`: keep the pointer (and so the hook) although nothing references it; a non-const
 * pointer so the section is writable in both PIC and non-PIC objects (gcc would otherwise
 * give a const pointer a different section type in a shared library, see "section type
 * conflict"). */
#define LIVESPLICE_HOOK_(kind, fn)                                                    \
    static int (*LIVESPLICE_CONCAT(livesplice_hook_##kind##_, fn))(void)             \
        __attribute__((section(".livesplice.hook." #kind), used, aligned(8))) = (fn)

#define LIVESPLICE_PRE_APPLY(fn) LIVESPLICE_HOOK_(pre_apply, fn)
#define LIVESPLICE_APPLY(fn) LIVESPLICE_HOOK_(apply, fn)
#define LIVESPLICE_POST_APPLY(fn) LIVESPLICE_HOOK_(post_apply, fn)
#define LIVESPLICE_FAIL_APPLY(fn) LIVESPLICE_HOOK_(fail_apply, fn)
#define LIVESPLICE_PRE_REVERSE(fn) LIVESPLICE_HOOK_(pre_reverse, fn)
#define LIVESPLICE_REVERSE(fn) LIVESPLICE_HOOK_(reverse, fn)
#define LIVESPLICE_POST_REVERSE(fn) LIVESPLICE_HOOK_(post_reverse, fn)
#define LIVESPLICE_FAIL_REVERSE(fn) LIVESPLICE_HOOK_(fail_reverse, fn)

#endif /* LIVESPLICE_H */
