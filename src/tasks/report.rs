//! Shift reports: for a ward or a patient over a period, the alerts per patient and priority
//! (how many, how many acknowledged, how long acknowledging took, how many escalated) and a
//! summary of the vitals, read from PostgreSQL and written as Excel (rust_xlsxwriter) or PDF
//! (pdf-writer, in the standard Courier font, so that every reader shows it the same).
//!
//! A report is a task on `reports.excel` or `reports.pdf`; the worker renders it into the
//! configured directory as `<report_id>.xlsx` or `<report_id>.pdf`.

use super::publisher::Task;
use crate::model::Millis;
use crate::sinks::postgres::query::{AlertSummary, Db, VitalsSummary};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a report covers: `ward` or `patient_id` (one of them), over `[from, to)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// Letters, digits, `-` and `_`: it names the file.
    pub report_id: String,
    #[serde(default)]
    pub ward: Option<String>,
    #[serde(default)]
    pub patient_id: Option<String>,
    /// Epoch milliseconds.
    pub from: Millis,
    pub to: Millis,
    /// Who asked: told by a `notification:new` in `user:<id>` once it is written.
    #[serde(default)]
    pub requested_by: Option<String>,
}

impl ReportRequest {
    /// Every problem with the request.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let id_ok = !self.report_id.is_empty()
            && self.report_id.len() <= 100
            && (self.report_id.chars()).all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            out.push("report_id: 1–100 letters, digits, `-` or `_`".into());
        }
        if self.ward.is_some() == self.patient_id.is_some() {
            out.push("give either `ward` or `patient_id`".into());
        }
        if self.from >= self.to {
            out.push("`from` must be before `to`".into());
        }
        out
    }

    /// The tasks that ask the worker for this report in these formats.
    pub fn tasks(&self, formats: &[Format], correlation_id: &str) -> Vec<Task> {
        (formats.iter())
            .map(|f| Task {
                id: format!("{}/{}", self.report_id, f.extension()),
                exchange: "nilecare.reports".into(),
                queue: f.queue().into(),
                priority: 1,
                correlation_id: correlation_id.into(),
                kind: format!("report.{}", f.extension()),
                body: serde_json::to_value(self).expect("a request is JSON"),
            })
            .collect()
    }

    fn scope(&self) -> String {
        match (&self.ward, &self.patient_id) {
            (Some(w), _) => format!("ward {w}"),
            (_, Some(p)) => format!("patient {p}"),
            _ => "everyone".into(),
        }
    }
}

/// A report's content.
#[derive(Debug, Clone, PartialEq)]
pub struct ShiftReport {
    pub request: ReportRequest,
    pub alerts: Vec<AlertSummary>,
    pub vitals: Vec<VitalsSummary>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Excel,
    Pdf,
}

impl Format {
    /// The format a report queue asks for.
    pub fn of_queue(queue: &str) -> Option<Format> {
        match queue {
            "reports.excel" => Some(Format::Excel),
            "reports.pdf" => Some(Format::Pdf),
            _ => None,
        }
    }

    pub fn queue(self) -> &'static str {
        match self {
            Format::Excel => "reports.excel",
            Format::Pdf => "reports.pdf",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Excel => "xlsx",
            Format::Pdf => "pdf",
        }
    }
}

impl ShiftReport {
    /// Reads the report's rows; `devices` are the ward's devices (from the engine's wards).
    pub async fn load(
        db: &Db,
        request: ReportRequest,
        devices: Option<Vec<String>>,
    ) -> Result<ShiftReport, crate::sinks::postgres::PgError> {
        let (patient, devices) = (request.patient_id.as_deref(), devices.as_deref());
        let alerts = db
            .alert_summary(patient, devices, request.from, request.to)
            .await?;
        let vitals = db
            .vitals_summary(patient, devices, request.from, request.to)
            .await?;
        Ok(ShiftReport {
            request,
            alerts,
            vitals,
        })
    }

    /// Writes the report into `dir` (through a temporary file, so a reader never sees half
    /// of one) and returns its path.
    pub fn write(&self, dir: &Path, format: Format) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let name = format!("{}.{}", self.request.report_id, format.extension());
        let (path, partial) = (dir.join(&name), dir.join(format!(".{name}.partial")));
        let bytes = match format {
            Format::Excel => self.excel()?,
            Format::Pdf => self.pdf(),
        };
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, &path)?;
        Ok(path)
    }

    fn title(&self) -> String {
        format!(
            "Shift report: {}, {} to {}",
            self.request.scope(),
            time(self.request.from),
            time(self.request.to)
        )
    }

    /// The alert table's header and rows, as text.
    fn alert_rows(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let header = vec![
            "Patient",
            "Priority",
            "Alerts",
            "Acknowledged",
            "Mean to ack (s)",
            "Longest to ack (s)",
            "Escalated",
        ];
        let rows = (self.alerts.iter())
            .map(|a| {
                vec![
                    a.subject.clone(),
                    a.priority.clone(),
                    a.alerts.to_string(),
                    a.acknowledged.to_string(),
                    seconds(a.mean_to_ack_s),
                    seconds(a.max_to_ack_s),
                    a.escalated.to_string(),
                ]
            })
            .collect();
        (header, rows)
    }

    fn vitals_rows(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let header = vec![
            "Patient",
            "Readings",
            "HR avg",
            "HR min",
            "HR max",
            "SpO2 avg",
            "SpO2 min",
            "Temp max",
            "RR avg",
            "Sys BP min",
        ];
        let rows = (self.vitals.iter())
            .map(|v| {
                let n = |x: Option<f64>| x.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
                vec![
                    v.subject.clone(),
                    v.readings.to_string(),
                    n(v.hr_avg),
                    n(v.hr_min),
                    n(v.hr_max),
                    n(v.spo2_avg),
                    n(v.spo2_min),
                    n(v.temp_max),
                    n(v.rr_avg),
                    n(v.sys_bp_min),
                ]
            })
            .collect();
        (header, rows)
    }

    fn excel(&self) -> Result<Vec<u8>, rust_xlsxwriter::XlsxError> {
        use rust_xlsxwriter::{Format as Style, Workbook};
        let bold = Style::new().set_bold();
        let mut book = Workbook::new();
        for (name, (header, rows)) in [
            ("Alerts", self.alert_rows()),
            ("Vitals", self.vitals_rows()),
        ] {
            let sheet = book.add_worksheet();
            sheet.set_name(name)?;
            sheet.write_string_with_format(0, 0, self.title(), &bold)?;
            for (c, h) in header.iter().enumerate() {
                sheet.write_string_with_format(2, c as u16, *h, &bold)?;
                sheet.set_column_width(c as u16, if c == 0 { 18 } else { 14 })?;
            }
            for (r, row) in rows.iter().enumerate() {
                for (c, cell) in row.iter().enumerate() {
                    // Numbers as numbers, so the sheet can sum and sort them.
                    match cell.parse::<f64>() {
                        Ok(x) if c > 0 => sheet.write_number(3 + r as u32, c as u16, x)?,
                        _ => sheet.write_string(3 + r as u32, c as u16, cell)?,
                    };
                }
            }
        }
        book.save_to_buffer()
    }

    /// The report as text lines, for the PDF.
    fn lines(&self) -> Vec<String> {
        let mut lines = vec![self.title(), String::new(), "Alerts".into()];
        let table = |(header, rows): (Vec<&str>, Vec<Vec<String>>), lines: &mut Vec<String>| {
            let width = |c: usize| {
                (rows.iter().map(|r| r[c].len()))
                    .chain([header[c].len()])
                    .max()
                    .unwrap_or(0)
            };
            let widths: Vec<usize> = (0..header.len()).map(width).collect();
            let line = |cells: Vec<&str>| {
                (cells.iter().zip(&widths))
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            lines.push(line(header.clone()));
            for row in &rows {
                lines.push(line(row.iter().map(String::as_str).collect()));
            }
            if rows.is_empty() {
                lines.push("(none)".into());
            }
        };
        table(self.alert_rows(), &mut lines);
        lines.extend([String::new(), "Vitals".into()]);
        table(self.vitals_rows(), &mut lines);
        lines
    }

    fn pdf(&self) -> Vec<u8> {
        use pdf_writer::{Content, Name, Pdf, Rect, Ref, Str};
        const LINES_PER_PAGE: usize = 70;
        let lines = self.lines();
        let pages: Vec<&[String]> = lines.chunks(LINES_PER_PAGE).collect();
        let (catalog, tree, font) = (Ref::new(1), Ref::new(2), Ref::new(3));
        let page_ref = |i: usize| Ref::new(4 + 2 * i as i32);
        let content_ref = |i: usize| Ref::new(5 + 2 * i as i32);
        let mut pdf = Pdf::new();
        pdf.catalog(catalog).pages(tree);
        pdf.pages(tree)
            .kids((0..pages.len()).map(page_ref))
            .count(pages.len() as i32);
        pdf.type1_font(font).base_font(Name(b"Courier"));
        for (i, page_lines) in pages.iter().enumerate() {
            // A4 landscape: the tables are wide.
            let mut page = pdf.page(page_ref(i));
            page.media_box(Rect::new(0.0, 0.0, 842.0, 595.0))
                .parent(tree)
                .contents(content_ref(i));
            page.resources().fonts().pair(Name(b"F1"), font);
            drop(page);
            let mut content = Content::new();
            content.begin_text();
            content.set_font(Name(b"F1"), 8.0);
            content.set_leading(7.8);
            content.next_line(30.0, 560.0);
            for line in *page_lines {
                // The standard fonts speak Latin-1: anything else becomes '?'.
                let bytes: Vec<u8> = (line.chars())
                    .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
                    .collect();
                content.show(Str(&bytes));
                content.next_line_using_leading();
            }
            content.end_text();
            pdf.stream(content_ref(i), &content.finish());
        }
        pdf.finish()
    }
}

fn seconds(s: Option<f64>) -> String {
    s.map(|s| format!("{s:.0}")).unwrap_or_else(|| "-".into())
}

/// `2026-11-27 13:05 UTC`.
fn time(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}
