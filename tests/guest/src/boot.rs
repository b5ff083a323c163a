//! PVH entry: the Xen ELF note and the 32-bit trampoline into 64-bit Rust.
//!
//! The PVH boot protocol enters at the note's physical address in 32-bit
//! protected mode with paging off, flat 4 GiB CS/DS/ES/SS and %ebx holding the
//! physical address of `struct hvm_start_info`. It promises nothing about the
//! GDT, IDT, CR4, EFER or the stack, so the trampoline sets all of them:
//!
//! 1. load our own GDT and data segments, clear `.bss` (not the stack);
//! 2. CR4 = PAE, CR3 = page tables identity-mapping 0..4 GiB with 2 MiB pages
//!    (built by the assembler, so there is no fill loop at run time), and
//!    an empty page directory at 4..5 GiB that `phys::window` points at
//!    any 2 MiB of physical memory, above 4 GiB too;
//! 3. EFER = LME, CR0 |= PG | PE, far jump to the 64-bit code segment;
//! 4. set the stack and call `testguest_main(start_info)`.
//!
//! There is no IDT: the guest runs with interrupts off and any exception
//! ends in a triple fault, which the VMM sees as a shutdown.

core::arch::global_asm!(
    r#"
    /* XEN_ELFNOTE_PHYS32_ENTRY (18): name "Xen\0", 4-byte physical entry. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start

    .section .boot32, "ax", @progbits
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi                  /* start_info, kept in %esi throughout */
    lgdt boot_gdt_ptr
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs

    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    mov $0x20, %eax                 /* CR4.PAE */
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           /* EFER = LME */
    mov $0x100, %eax
    xor %edx, %edx
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            /* PG | PE */
    mov %eax, %cr0
    ljmp $0x08, $boot_long_mode

    .section .text.boot64, "ax", @progbits
    .code64
boot_long_mode:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lea boot_stack_top(%rip), %rsp
    mov %esi, %edi
    call testguest_main
2:
    cli
    hlt
    jmp 2b

    .section .data.boot_gdt, "aw", @progbits
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08: 64-bit code, accessed */
    .quad 0x00cf93000000ffff        /* 0x10: flat data, accessed */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .data.boot_page_tables, "aw", @progbits
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x3           /* present, writable */
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x0003
    .quad boot_pd + 0x1003
    .quad boot_pd + 0x2003
    .quad boot_pd + 0x3003
    .quad boot_window_pd + 0x3      /* 4..5 GiB: phys::window */
    .fill 507, 8, 0
boot_pd:
    .set boot_page, 0
    .rept 2048
    .quad boot_page + 0x83          /* present, writable, 2 MiB page */
    .set boot_page, boot_page + 0x200000
    .endr
    .balign 4096
    .globl boot_window_pd
boot_window_pd:
    .fill 512, 8, 0

    .section .stack, "aw", @nobits
    .balign 16
    .skip 16384
boot_stack_top:

    .text
"#,
    options(att_syntax)
);
