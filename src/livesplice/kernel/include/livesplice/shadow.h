/*
 * livesplice/shadow.h - shadow variables for kernel live patches (livesplice create --kernel).
 *
 * An object already in memory cannot grow: a patch that needs a new member of an existing
 * struct (a counter, a lock, a flag) attaches a SHADOW variable to the object instead. A
 * shadow is found by (object address, id); the kernel's livepatch core keeps them in a
 * hash table (klp_shadow_*, Documentation/livepatch/shadow-vars.rst), so the running
 * kernel's structures stay untouched and the old code never sees the new state.
 *
 *   #include <livesplice/shadow.h>
 *   #define CMDLINE_READS LIVESPLICE_SHADOW_ID('c', 'm', 'd', 1)
 *
 *   unsigned long *reads = livesplice_shadow_get_or_zalloc(inode, CMDLINE_READS,
 *                                                          sizeof(*reads), GFP_KERNEL);
 *   if (reads)
 *           (*reads)++;
 *
 * Free what the update allocated when it goes out, from a LIVESPLICE_POST_REVERSE hook
 * (<livesplice/livesplice.h>, run as the livepatch post_unpatch callback):
 *
 *   static int drop_reads(void) { livesplice_shadow_free_all(CMDLINE_READS); return 0; }
 *   LIVESPLICE_POST_REVERSE(drop_reads);
 *
 * `livesplice create --kernel` places this header (and livesplice.h) in the build's copy of
 * the tree under include/livesplice/, so a patch includes them without adding them.
 */
#ifndef LIVESPLICE_SHADOW_H
#define LIVESPLICE_SHADOW_H

#include <linux/gfp.h>
#include <linux/livepatch.h>

/* A shadow id: four characters, so that two updates do not pick the same number. */
#define LIVESPLICE_SHADOW_ID(a, b, c, d)                                                 \
	(((unsigned long)(a) << 24) | ((unsigned long)(b) << 16) |                        \
	 ((unsigned long)(c) << 8) | (unsigned long)(d))

/* The shadow of `obj` with `id`, or NULL when none was attached. */
static inline void *livesplice_shadow_get(void *obj, unsigned long id)
{
	return klp_shadow_get(obj, id);
}

/* The shadow of `obj` with `id`; attached zero-filled on first use. NULL: out of memory. */
static inline void *livesplice_shadow_get_or_zalloc(void *obj, unsigned long id, size_t size,
						    gfp_t gfp)
{
	return klp_shadow_get_or_alloc(obj, id, size, gfp, NULL, NULL);
}

/* Detach and free the shadow of `obj` with `id` (when `obj` itself is freed). */
static inline void livesplice_shadow_free(void *obj, unsigned long id)
{
	klp_shadow_free(obj, id, NULL);
}

/* Detach and free every shadow with `id` (the update is going out). */
static inline void livesplice_shadow_free_all(unsigned long id)
{
	klp_shadow_free_all(id, NULL);
}

#endif /* LIVESPLICE_SHADOW_H */
