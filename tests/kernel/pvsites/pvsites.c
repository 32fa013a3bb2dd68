// SPDX-License-Identifier: GPL-2.0
/*
 * Kernel code with the paravirt patterns of a PARAVIRT_XXL kernel, for
 * tests/test_kernel_paravirt.py: every function below holds `call *pv_ops+N(%rip)`
 * sites (.parainstructions), most of them inside ALTERNATIVE(..., ALT_NOT(XENPV))
 * (.altinstructions) that a native boot replaces by the native instruction.
 * Built, never loaded.
 */
#include <linux/module.h>
#include <linux/irqflags.h>
#include <linux/pgtable.h>
#include <asm/paravirt.h>

noinline pteval_t lsp_pte_val(pte_t pte)
{
	return pte_val(pte);		/* ALT_NOT(XENPV): mov %rdi,%rax */
}

noinline unsigned long lsp_irq_save(void)
{
	unsigned long flags;

	local_irq_save(flags);		/* pushf; pop %rax  then  cli */
	local_irq_restore(flags);
	return flags;
}

noinline void lsp_flush_tlb(void)
{
	__flush_tlb_local();		/* a plain pv call: apply_paravirt only */
}

EXPORT_SYMBOL(lsp_pte_val);
EXPORT_SYMBOL(lsp_irq_save);
EXPORT_SYMBOL(lsp_flush_tlb);
MODULE_LICENSE("GPL");
