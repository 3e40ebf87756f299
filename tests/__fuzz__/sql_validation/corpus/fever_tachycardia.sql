-- Fever with tachycardia in the same window (two SIRS criteria at once): temperature above
-- 38.0 °C and average heart rate above 90 bpm. Window: 60 s tumbling (pipelines/analyst.toml).
SELECT device_id, patient_id, max(temp) AS value,
       'Fever ' || CAST(round(max(temp), 1) AS VARCHAR) || ' °C with heart rate '
           || CAST(round(avg(hr)) AS VARCHAR) || ' bpm' AS message
FROM vitals
GROUP BY device_id, patient_id
HAVING max(temp) > 38.0 AND avg(hr) > 90
