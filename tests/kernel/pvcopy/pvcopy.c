// SPDX-License-Identifier: GPL-2.0
/*
 * For tests/test_kernel_paravirt_copies.py: built twice, as is (the pre object) and with
 * -DLSP_POST (the post object), whose lsp_flags gains a static_cpu_has() branch (a jump
 * into .altinstr_aux) and an ALTERNATIVE whose replacement calls lsp_fast, an unchanged
 * function nobody exports. Built, never loaded.
 */
#include <linux/module.h>
#include <linux/irqflags.h>
#include <asm/alternative.h>
#include <asm/cpufeature.h>

noinline void lsp_slow(void) { barrier(); }
noinline void lsp_fast(void) { barrier(); }

noinline unsigned long lsp_flags(void)
{
	unsigned long flags;

	local_irq_save(flags);		/* paravirt sites inside ALT_NOT(XENPV) alternatives */
	local_irq_restore(flags);
#ifdef LSP_POST
	if (static_cpu_has(X86_FEATURE_ERMS))
		flags |= 2;
	asm volatile(ALTERNATIVE("call lsp_slow", "call lsp_fast", X86_FEATURE_FSRM)
		     ::: "memory", "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11");
#endif
	return flags;
}

EXPORT_SYMBOL(lsp_flags);
MODULE_LICENSE("GPL");
