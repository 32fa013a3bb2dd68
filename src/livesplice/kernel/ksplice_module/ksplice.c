// SPDX-License-Identifier: GPL-2.0
/*
 * livesplice: Ksplice's own switch, for replaced functions livepatch cannot reach.
 *
 * Livepatch redirects a function through its ftrace entry (`call __fentry__`); code built
 * without one (all of lib/, notrace) cannot be redirected that way. Ksplice did not need
 * ftrace: it stopped the machine, checked that no task was inside the code being replaced
 * and wrote a jump over the old function's first instruction. This file does the same,
 * inside a livesplice livepatch module (built by livesplice/kernel/klp.py, tables from
 * glue.c):
 *
 *  - the livepatch core is used only to load the module's code and resolve its symbols
 *    (klp relocations); the functions below are NOT klp_funcs;
 *  - apply = the vmlinux klp_object's pre_patch callback: stop_machine on every online
 *    CPU, each CPU records its stack pointer, one CPU checks every task's kernel stack
 *    word by word (from its saved stack pointer up) against the old functions' ranges,
 *    compares the bytes at each old entry with what run-pre matching read in user space
 *    (module parameter `ksplice_head`), writes `jmp rel32` with text_poke() and every CPU
 *    serialises (sync_core) before leaving the stop. Busy -> -EBUSY and nothing is written;
 *    the `busy` parameter and the kernel log name the task and where it is;
 *  - undo = writing 0 to the `spliced` parameter: the same stop, the stacks checked against
 *    the old AND the new code (the new code is freed at rmmod), the saved bytes restored;
 *  - while spliced the module holds a reference to itself, so rmmod cannot free the new
 *    code under the jumps.
 *
 * text_poke(), text_mutex, stop_machine_cpuslocked() and idle_task() are not exported to
 * modules in 6.1; as the replacement code does, they are reached through livepatch relocations (.klp.sym.vmlinux.NAME,0), applied
 * by the kernel when it loads this livepatch module. text_poke() is safe with interrupts
 * off and the other CPUs stopped (kgdb calls it that way: text_poke_kgdb); text_mutex is
 * taken around the stop so no other text poker is half-way through a write.
 */
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/cpu.h>
#include <linux/kallsyms.h>
#include <linux/ktime.h>
#include <linux/livepatch.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/rcupdate.h>
#include <linux/sched/signal.h>
#include <linux/sched/task_stack.h>
#include <linux/stop_machine.h>
#include <linux/string.h>
#include <asm/processor.h>
#include <asm/sync_core.h>

#define LSP_JMP_LEN 5
#define LSP_MAX 64

/* from glue.c: the replaced functions, in `ksplice_addr=` order */
extern const int lsp_ksplice_n;
extern char *const lsp_ksplice_new[];
extern const char *const lsp_ksplice_name[];
/* from glue.c: every piece of shipped code (what rmmod frees) */
extern const int lsp_code_n;
extern char *const lsp_code[];
extern const unsigned long lsp_code_size[];

/* not exported in 6.1: reached through livepatch relocations (see the top comment) */
asm(".pushsection .data..lsp_klp,\"aw\",@progbits\n"
    ".balign 8\n"
    "lsp_text_poke_ptr: .quad 0\n"
    ".reloc lsp_text_poke_ptr, R_X86_64_64, \".klp.sym.vmlinux.text_poke,0\"\n"
    "lsp_text_mutex_ptr: .quad 0\n"
    ".reloc lsp_text_mutex_ptr, R_X86_64_64, \".klp.sym.vmlinux.text_mutex,0\"\n"
    "lsp_stop_machine_cpuslocked_ptr: .quad 0\n"
    ".reloc lsp_stop_machine_cpuslocked_ptr, R_X86_64_64, "
    "\".klp.sym.vmlinux.stop_machine_cpuslocked,0\"\n"
    "lsp_idle_task_ptr: .quad 0\n"
    ".reloc lsp_idle_task_ptr, R_X86_64_64, \".klp.sym.vmlinux.idle_task,0\"\n"
    ".popsection\n");
extern void *(*lsp_text_poke_ptr)(void *addr, const void *opcode, size_t len);
extern struct mutex *lsp_text_mutex_ptr;
extern int (*lsp_stop_machine_cpuslocked_ptr)(cpu_stop_fn_t fn, void *data,
					      const struct cpumask *cpus);
extern struct task_struct *(*lsp_idle_task_ptr)(int cpu);

static unsigned long lsp_addr[LSP_MAX];
static int lsp_naddr;
module_param_array_named(ksplice_addr, lsp_addr, ulong, &lsp_naddr, 0400);
MODULE_PARM_DESC(ksplice_addr, "entry of each old function (from run-pre matching)");
static unsigned long lsp_head[LSP_MAX];
static int lsp_nhead;
module_param_array_named(ksplice_head, lsp_head, ulong, &lsp_nhead, 0400);
MODULE_PARM_DESC(ksplice_head, "first 5 bytes at each entry as run-pre matching read them");

struct lsp_func {
	unsigned long old;	/* where the jump goes: the old entry */
	unsigned long old_size;	/* kallsyms' size of the old function */
	unsigned long new;
	u8 saved[LSP_JMP_LEN];	/* the bytes the jump replaces, restored at undo */
	u8 jmp[LSP_JMP_LEN];
};

static struct lsp_func lsp_funcs[LSP_MAX];
static bool lsp_spliced;
static char lsp_busy[256];
static unsigned long lsp_stop_ns;
module_param_named(stop_ns, lsp_stop_ns, ulong, 0400);
MODULE_PARM_DESC(stop_ns, "how long the last stop_machine lasted (ns, measured around it)");
static DEFINE_PER_CPU(unsigned long, lsp_cpu_sp);
static DEFINE_MUTEX(lsp_lock);	/* one apply/undo of this module at a time */

struct lsp_stop {
	bool undo;
	atomic_t arrived;
	atomic_t done;
	int ret;
};

static bool lsp_in(unsigned long v, unsigned long start, unsigned long size)
{
	return v >= start && v < start + size;
}

/*
 * Whether a stack word points into code being replaced (apply) or removed (undo: the old
 * functions, and all the shipped code -- .cold parts, new functions reached by a tail
 * call -- since rmmod frees it).
 */
static bool lsp_hits(unsigned long v, bool undo)
{
	int i;

	for (i = 0; i < lsp_ksplice_n; i++)
		if (lsp_in(v, lsp_funcs[i].old, lsp_funcs[i].old_size))
			return true;
	for (i = 0; undo && i < lsp_code_n; i++)
		if (lsp_in(v, (unsigned long)lsp_code[i], lsp_code_size[i]))
			return true;
	return false;
}

/*
 * Scan the live part of one task's kernel stack. A sleeping task's live part starts at its
 * saved stack pointer (thread.sp); a task on a CPU is that CPU's stopper (or us), whose
 * stack pointer each CPU recorded on entering the stop; an interrupted task's registers
 * (and so its IP) are on its own stack, above that pointer. Every word is checked, not only
 * return addresses: like Ksplice, a false "busy" is a retry, a missed one a crash.
 */
static int lsp_check_task(struct task_struct *t, bool undo)
{
	unsigned long *base = t->stack, *sp, *end;

	if (!base)
		return 0;	/* a dead task whose stack is already freed */
	end = (unsigned long *)((char *)base + THREAD_SIZE);
	if (t == current)
		sp = (unsigned long *)current_stack_pointer;
	else if (READ_ONCE(t->on_cpu))
		sp = (unsigned long *)per_cpu(lsp_cpu_sp, task_cpu(t));
	else
		sp = (unsigned long *)t->thread.sp;
	if (sp < base || sp >= end)
		sp = base;	/* unknown: the whole stack */
	for (; sp < end; sp++) {
		if (lsp_hits(*sp, undo)) {
			snprintf(lsp_busy, sizeof(lsp_busy), "pid %d (%s) has %pS on its stack",
				 task_pid_nr(t), t->comm, (void *)*sp);
			return -EBUSY;
		}
	}
	return 0;
}

static int lsp_check_stacks(bool undo)
{
	struct task_struct *g, *t;
	int cpu, ret = 0;

	/* the idle tasks are not on the task list; one may be interrupted (not asleep) */
	for_each_online_cpu(cpu) {
		ret = lsp_check_task(lsp_idle_task_ptr(cpu), undo);
		if (ret)
			return ret;
	}
	rcu_read_lock();
	for_each_process_thread(g, t) {
		ret = lsp_check_task(t, undo);
		if (ret)
			goto out;	/* two nested loops: a break would only end the inner */
	}
out:
	rcu_read_unlock();
	return ret;
}

/* The switch itself, on one CPU while the others wait in lsp_stop_fn. */
static int lsp_switch(bool undo)
{
	int i, ret;

	ret = lsp_check_stacks(undo);
	if (ret)
		return ret;
	for (i = 0; i < lsp_ksplice_n; i++) {
		const u8 *expect = undo ? lsp_funcs[i].jmp : lsp_funcs[i].saved;

		if (memcmp((void *)lsp_funcs[i].old, expect, LSP_JMP_LEN)) {
			snprintf(lsp_busy, sizeof(lsp_busy),
				 "%s: the bytes at %px are not what run-pre matching saw (%5ph)",
				 lsp_ksplice_name[i], (void *)lsp_funcs[i].old,
				 (void *)lsp_funcs[i].old);
			return -EINVAL;
		}
	}
	for (i = 0; i < lsp_ksplice_n; i++)
		lsp_text_poke_ptr((void *)lsp_funcs[i].old,
				  undo ? lsp_funcs[i].saved : lsp_funcs[i].jmp, LSP_JMP_LEN);
	return 0;
}

static int lsp_stop_fn(void *data)
{
	struct lsp_stop *st = data;

	/* inside the stop the online CPUs cannot change: every CPU picks the same master */
	this_cpu_write(lsp_cpu_sp, current_stack_pointer);
	if (smp_processor_id() != cpumask_first(cpu_online_mask)) {
		atomic_inc(&st->arrived);
		while (!atomic_read(&st->done))
			cpu_relax();
		sync_core();	/* cross-modified code: serialise before running it */
		return 0;
	}
	while (atomic_read(&st->arrived) < (int)num_online_cpus() - 1)
		cpu_relax();
	st->ret = lsp_switch(st->undo);
	atomic_set(&st->done, 1);
	sync_core();
	return st->ret;
}

static int lsp_stop_and_switch(bool undo)
{
	struct lsp_stop st = { .undo = undo };
	u64 t0;
	int ret;

	lsp_busy[0] = '\0';
	atomic_set(&st.arrived, 0);
	atomic_set(&st.done, 0);
	/* the kernel's order (kprobes, jump labels): hotplug lock, then text_mutex */
	cpus_read_lock();
	mutex_lock(lsp_text_mutex_ptr);
	t0 = ktime_get_ns();
	ret = lsp_stop_machine_cpuslocked_ptr(lsp_stop_fn, &st, cpu_online_mask);
	lsp_stop_ns = ktime_get_ns() - t0;
	mutex_unlock(lsp_text_mutex_ptr);
	cpus_read_unlock();
	if (ret)
		pr_warn("livesplice: %s refused (%d): %s\n", undo ? "undo" : "apply", ret, lsp_busy);
	return ret;
}

/* Everything that can be checked before the stop: parameters and the old entries. */
static int lsp_prepare(void)
{
	char sym[KSYM_SYMBOL_LEN];
	unsigned long size, offset;
	int i;

	if (lsp_ksplice_n > LSP_MAX || lsp_naddr != lsp_ksplice_n || lsp_nhead != lsp_ksplice_n) {
		pr_err("livesplice: %d functions but %d ksplice_addr and %d ksplice_head\n",
		       lsp_ksplice_n, lsp_naddr, lsp_nhead);
		return -EINVAL;
	}
	for (i = 0; i < lsp_ksplice_n; i++) {
		struct lsp_func *f = &lsp_funcs[i];
		long rel;
		char *plus;

		/* the address must be the entry of a function of that name (kallsyms) */
		sprint_symbol(sym, lsp_addr[i]);
		plus = strchr(sym, '+');
		if (!plus || plus - sym != strlen(lsp_ksplice_name[i]) ||
		    strncmp(sym, lsp_ksplice_name[i], plus - sym) ||
		    sscanf(plus, "+%lx/%lx", &offset, &size) != 2 || offset != 0 ||
		    size < LSP_JMP_LEN) {
			pr_err("livesplice: ksplice_addr %px is %s, not the entry of %s\n",
			       (void *)lsp_addr[i], sym, lsp_ksplice_name[i]);
			return -EINVAL;
		}
		f->old = lsp_addr[i];
		f->old_size = size;
		f->new = (unsigned long)lsp_ksplice_new[i];
		memcpy(f->saved, &lsp_head[i], LSP_JMP_LEN);
		rel = (long)f->new - (long)(f->old + LSP_JMP_LEN);
		if (rel != (long)(s32)rel) {
			pr_err("livesplice: %s: new code out of jmp rel32 range\n",
			       lsp_ksplice_name[i]);
			return -ERANGE;
		}
		f->jmp[0] = 0xe9;
		*(s32 *)&f->jmp[1] = (s32)rel;
	}
	return 0;
}

/* The vmlinux klp_object's pre_patch callback (glue.c): relocations are applied by now. */
int lsp_ksplice_apply(struct klp_object *obj)
{
	int ret;

	mutex_lock(&lsp_lock);
	ret = lsp_prepare();
	if (!ret)
		ret = lsp_stop_and_switch(false);
	if (!ret) {
		lsp_spliced = true;
		__module_get(THIS_MODULE);	/* no rmmod while jumps lead into this module */
	}
	mutex_unlock(&lsp_lock);
	return ret;
}

/* `spliced` parameter: read: the spliced functions; write 0: undo, 1: splice again. */
static int lsp_spliced_set(const char *val, const struct kernel_param *kp)
{
	bool want;
	int ret = kstrtobool(val, &want);

	if (ret)
		return ret;
	mutex_lock(&lsp_lock);
	if (want != lsp_spliced) {
		ret = lsp_stop_and_switch(!want);
		if (!ret) {
			lsp_spliced = want;
			if (want)
				__module_get(THIS_MODULE);
			else
				module_put(THIS_MODULE);
		}
	}
	mutex_unlock(&lsp_lock);
	return ret;
}

static int lsp_spliced_get(char *buf, const struct kernel_param *kp)
{
	int i, n = 0;

	mutex_lock(&lsp_lock);
	for (i = 0; lsp_spliced && i < lsp_ksplice_n; i++)
		n += scnprintf(buf + n, PAGE_SIZE - n, "%s%s@%px", i ? " " : "",
			       lsp_ksplice_name[i], (void *)lsp_funcs[i].old);
	n += scnprintf(buf + n, PAGE_SIZE - n, "\n");
	mutex_unlock(&lsp_lock);
	return n;
}

static const struct kernel_param_ops lsp_spliced_ops = {
	.set = lsp_spliced_set,
	.get = lsp_spliced_get,
};
module_param_cb(spliced, &lsp_spliced_ops, NULL, 0600);
MODULE_PARM_DESC(spliced, "functions switched by the Ksplice path; write 0 to undo");

static int lsp_busy_get(char *buf, const struct kernel_param *kp)
{
	return scnprintf(buf, PAGE_SIZE, "%s\n", lsp_busy);
}

static const struct kernel_param_ops lsp_busy_ops = { .get = lsp_busy_get };
module_param_cb(busy, &lsp_busy_ops, NULL, 0400);
MODULE_PARM_DESC(busy, "why the last apply or undo was refused");
